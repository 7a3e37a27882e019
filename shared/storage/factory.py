"""Turn ``STORAGE_URL`` into an ``ObjectStore``, so one setting picks the backend.

Forms:
  - ``file:///abs/path`` or a plain path (``var/storage``): a local directory, served by
    the API's ``/v1/files`` route with signed URLs.
  - ``s3://bucket?endpoint=http://host:port&region=us-east-1&public_endpoint=http://...``
    ``&create_bucket=1``: an S3-compatible bucket. Credentials come from the URL's userinfo
    (``s3://KEY:SECRET@bucket``, percent-encoded) or from ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``.

Unknown query parameters are errors, not ignored: a misspelt ``endpont=`` silently sending
images to AWS would be far worse than a failed start. boto3 is imported only for ``s3://``
so the API's import time does not pay for it when it stores locally.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from shared.storage.base import ObjectStore
from shared.storage.local import LocalObjectStore

ALLOWED_FORMS = (
    "file:///absolute/path, a plain directory path, or "
    "s3://[KEY:SECRET@]bucket?endpoint=URL&region=NAME&public_endpoint=URL&create_bucket=1"
)
_S3_PARAMS = frozenset({"endpoint", "region", "public_endpoint", "create_bucket"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def store_from_url(storage_url: str, *, secret: bytes, public_base_url: str) -> ObjectStore:
    """Build the store ``storage_url`` names; ValueError explains a malformed URL."""
    if not storage_url or not storage_url.strip():
        raise ValueError(f"STORAGE_URL is empty; expected {ALLOWED_FORMS}")
    storage_url = storage_url.strip()
    parts = urlsplit(storage_url)
    scheme = parts.scheme.lower()
    if scheme == "":
        return LocalObjectStore(Path(storage_url), public_base_url=public_base_url, secret=secret)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// storage URL must name a local path, got host {parts.netloc!r}")
        if not parts.path:
            raise ValueError(f"file:// storage URL has no path; expected {ALLOWED_FORMS}")
        return LocalObjectStore(Path(unquote(parts.path)), public_base_url=public_base_url, secret=secret)
    if scheme == "s3":
        return _s3_store(storage_url)
    raise ValueError(f"unsupported storage URL scheme {parts.scheme!r}; expected {ALLOWED_FORMS}")


def _s3_store(storage_url: str) -> ObjectStore:
    parts = urlsplit(storage_url)
    userinfo, _, bucket = parts.netloc.rpartition("@")
    if not bucket:
        raise ValueError(f"s3:// storage URL names no bucket; expected {ALLOWED_FORMS}")
    if parts.path not in ("", "/"):
        raise ValueError(f"s3:// storage URL must not have a path after the bucket, got {parts.path!r}")
    if parts.fragment:
        raise ValueError("s3:// storage URL must not have a #fragment")

    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - _S3_PARAMS)
    if unknown:
        allowed = ", ".join(sorted(_S3_PARAMS))
        raise ValueError(f"unknown s3:// storage URL parameter(s) {', '.join(unknown)}; allowed: {allowed}")
    params = {name: values[-1] for name, values in query.items()}

    access_key: str | None
    secret_key: str | None
    if userinfo:
        key_part, sep, secret_part = userinfo.partition(":")
        if not sep or not key_part or not secret_part:
            raise ValueError("s3:// storage URL credentials must be KEY:SECRET (percent-encoded)")
        access_key, secret_key = unquote(key_part), unquote(secret_part)
    else:
        access_key = os.environ.get("AWS_ACCESS_KEY_ID") or None
        secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or None

    create_flag = params.get("create_bucket", "").strip().lower()
    if create_flag not in _TRUE | _FALSE:
        raise ValueError(f"create_bucket must be 1/0/true/false, got {params['create_bucket']!r}")

    from shared.storage.s3 import S3ObjectStore  # deferred: boto3 is slow to import

    return S3ObjectStore(
        bucket=bucket,
        endpoint_url=params.get("endpoint") or None,
        region=params.get("region") or "us-east-1",
        access_key=access_key,
        secret_key=secret_key,
        public_endpoint_url=params.get("public_endpoint") or None,
        create_bucket=create_flag in _TRUE,
    )
