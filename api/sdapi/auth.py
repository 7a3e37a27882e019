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
from starlette.concurrency import run_in_threadpool

from shared.auth import API_KEY_CACHE, detached_api_key
from shared.db.models import ApiKey
from shared.db.session import get_session_factory
from shared.settings import get_settings

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


def _find_detached(candidates: list[str]) -> ApiKey | None:
    ttl = get_settings().gateway.api_key_cache_seconds
    with get_session_factory()() as session:
        for candidate in candidates:
            key = detached_api_key(session, candidate, ttl)
            if key is not None:
                return key
    return None


async def require_sdapi_key(request: Request) -> ApiKey:
    """The caller's key, from the process's key cache (shared/auth.py; no thread, no query) or else read in a
    session of its own that is closed before the route runs.

    txt2img/img2img wait for their job for seconds or minutes; a request-scoped session opened
    for auth would hold a pooled database connection idle for that whole wait. The key is detached and carries no
    `webhook_secret` when it came from the cache.
    """
    candidates = credentials(request.headers.get("authorization", ""))
    for candidate in candidates:
        cached = API_KEY_CACHE.cached(candidate)
        if cached is not None:
            return cached
    key = await run_in_threadpool(_find_detached, candidates) if candidates else None
    if key is not None:
        return key
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key: use HTTP Basic auth with the API key as the password "
               "(any username), or 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": 'Basic realm="renderfarm sdapi", Bearer'},
    )


SdapiKey = Annotated[ApiKey, Depends(require_sdapi_key)]
