"""Auth for ``/sdapi/v1``: the WebUI's ``--api-auth`` (HTTP Basic) with an API key as the password, or Bearer.

WebUI clients only know Basic auth (``webuiapi.WebUIApi(username=..., password=...)``), so the
password carries the farm API key and the username is free (a label for the user's own logs).
A key sent as the username with an empty password is accepted too, since some tools put a single
secret there. Bearer works as on the rest of the API.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from api.deps import lookup_detached_key
from shared.db.models import ApiKey

__all__ = ["SdapiKey", "credentials", "require_sdapi_key"]


def credentials(authorization: str) -> list[str]:
    """The candidate keys an Authorization header carries, best guess first."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if not value:
        return []
    if scheme.lower() == "bearer":
        return [value]
    if scheme.lower() != "basic":
        return []
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return []
    username, _, password = decoded.partition(":")
    return [password] if password else ([username] if username else [])


async def require_sdapi_key(request: Request) -> ApiKey:
    """The caller's key, through `api.deps.lookup_detached_key` (the process's key cache, or a session of its own
    that is closed before the route runs).

    txt2img/img2img wait for their job for seconds or minutes; a request-scoped session opened
    for auth would hold a pooled database connection idle for that whole wait. The key is detached and carries no
    `webhook_secret` when it came from the cache.
    """
    for candidate in credentials(request.headers.get("authorization", "")):
        key = await lookup_detached_key(candidate)
        if key is not None:
            return key
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key: use HTTP Basic auth with the API key as the password "
               "(any username), or 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": 'Basic realm="renderfarm sdapi", Bearer'},
    )


SdapiKey = Annotated[ApiKey, Depends(require_sdapi_key)]
