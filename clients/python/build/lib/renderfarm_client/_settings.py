"""Where the farm is and which key to use: arguments first, then RENDERFARM_URL and RENDERFARM_API_KEY."""

from __future__ import annotations

import os

DEFAULT_URL = "http://127.0.0.1:7861"  # `make up`'s address


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get("RENDERFARM_URL") or DEFAULT_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("RENDERFARM_API_KEY") or None
