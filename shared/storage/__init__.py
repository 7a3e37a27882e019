"""Where rendered images live: one ``ObjectStore`` protocol, a local and an S3 adapter.

``S3ObjectStore`` is loaded on first use, so importing this package (which the API does at
start) does not import boto3 unless S3 is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.storage.base import (
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    TransientStorageError,
    validate_key,
)
from shared.storage.factory import store_from_url
from shared.storage.local import LocalObjectStore

if TYPE_CHECKING:
    from shared.storage.s3 import S3ObjectStore

__all__ = [
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3ObjectStore",
    "StorageError",
    "TransientStorageError",
    "store_from_url",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    if name == "S3ObjectStore":
        from shared.storage.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
