"""Fetching a model file from a URL for the model store (``POST /v1/models/import``), behind the SSRF guard.

The URL is checked as a webhook's is (:mod:`shared.webhooks.ssrf`): it must resolve to public addresses only,
unless the operator allowed the host (``RENDERFARM_MODEL_IMPORT_ALLOW_HOSTS``), and the connection goes to an
address that was checked (no second DNS answer). Redirects (model hubs answer with one to their CDN) are
followed by hand, each new URL checked the same way, at most :data:`MAX_REDIRECTS`. The body streams to a file,
cut off past ``max_bytes``; nothing is stored here, the caller checks and registers the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from shared.errors import FieldError
from shared.webhooks.ssrf import WebhookUrlError, check_webhook_url

MAX_REDIRECTS = 5
ALLOW_ENV = "RENDERFARM_MODEL_IMPORT_ALLOW_HOSTS"
USER_AGENT = "renderfarm-model-import/1"
FIELD = ("body", "url")


class ImportTooLargeError(ValueError):
    """The URL's file is larger than the store takes."""


def _file_name(response: httpx.Response, url: str) -> str:
    disposition = response.headers.get("content-disposition", "")
    found = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", disposition, re.IGNORECASE)
    name = unquote(found.group(1)) if found else unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return Path(name).name


def fetch_to(url: str, dest: Path, *, max_bytes: int, allow_hosts: tuple[str, ...], timeout: float) -> str:
    """Download ``url`` to ``dest``; returns the file name the server gave (Content-Disposition, else the last
    path segment). Raises FieldError (refused or failing URL, naming ``url``) or ImportTooLargeError."""
    current = url
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = check_webhook_url(current, allow_hosts=allow_hosts, only_hosts=(), field="url",
                                           allow_env=ALLOW_ENV)
            except WebhookUrlError as exc:
                raise FieldError(FIELD, str(exc)) from exc
            headers = {"Host": target.host_header, "User-Agent": USER_AGENT}
            extensions = {"sni_hostname": target.sni_hostname} if target.scheme == "https" and target.sni_hostname \
                else {}
            try:
                with client.stream("GET", target.pinned_url(target.addresses[0]), headers=headers,
                                   extensions=extensions) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urljoin(current, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise FieldError(FIELD, f"{url} answered HTTP {response.status_code}; a model URL must "
                                                "answer 200 with the file")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise ImportTooLargeError(f"the file at the URL is {declared} bytes, more than {max_bytes}")
                    written = 0
                    with open(dest, "wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            written += len(chunk)
                            if written > max_bytes:
                                raise ImportTooLargeError(f"the file at the URL is larger than {max_bytes} bytes")
                            out.write(chunk)
                    return _file_name(response, current)
            except httpx.HTTPError as exc:
                raise FieldError(FIELD, f"could not download {url}: {type(exc).__name__}: {exc}") from exc
    raise FieldError(FIELD, f"{url} redirected more than {MAX_REDIRECTS} times")
