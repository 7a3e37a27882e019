"""The one interface the API and the workers use for image bytes.

Outputs live under deterministic keys (``jobs/{job_id}/{index}.png``) so that a re-run
overwrites instead of duplicating; the same key must mean the same object on local disk and
on S3. ``validate_key`` is the single gate both adapters pass every key through, so a key
that could escape a directory or alias another key (``../x``, ``a//b``, ``a\\b``) is refused
before it reaches a filesystem path or a URL.

Errors come in two kinds because callers treat them differently (docs/architecture.md, rule 8):
``TransientStorageError`` (network trouble, 5xx, throttling) is retried with backoff;
any other ``StorageError`` (bad credentials, missing bucket, missing object) is not.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

# S3 caps keys at 1024 bytes of UTF-8; applying the same cap locally keeps both stores
# interchangeable.
MAX_KEY_BYTES = 1024


class StorageError(Exception):
    """The store refused or failed an operation; retrying will not help."""


class TransientStorageError(StorageError):
    """The store could not be reached or answered 5xx/throttled; retry with backoff."""


class ObjectNotFoundError(StorageError):
    """``get`` asked for a key that holds no object."""


@runtime_checkable
class ObjectStore(Protocol):
    """Bytes under string keys, readable by clients through an expiring URL."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing any previous object whole."""
        ...

    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ``ObjectNotFoundError`` if there is none."""
        ...

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        """Store the file at ``path`` under ``key`` streamed, never whole in memory (multi-GB model files)."""
        ...

    def get_file(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """Write the object to ``path`` streamed; raise ``ObjectNotFoundError`` if there is none. ``on_bytes`` is
        called with each chunk's size as it arrives (progress, or a bandwidth cap that sleeps in it)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...

    def url(self, key: str, expires_in: int) -> str:
        """A URL a client can GET for ``expires_in`` seconds without other credentials."""
        ...

    def check(self) -> None:
        """Raise ``StorageError`` if the store is unusable right now (readiness probes)."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative object key, else raise ValueError.

    Allowed: ``/``-separated non-empty segments, none of them ``.`` or ``..``, no leading
    ``/``, no backslash, no control characters, at most 1024 UTF-8 bytes.
    """
    if not isinstance(key, str):
        raise ValueError(f"storage key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("storage key must not be empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"storage key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise ValueError(f"storage key must be relative, got absolute path {key!r}")
    if "\\" in key:
        raise ValueError(f"storage key must use '/' separators, got a backslash in {key!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise ValueError(f"storage key must not contain control characters: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage key segments must be non-empty and not '.' or '..': {key!r}")
    return key
