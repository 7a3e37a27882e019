"""The process-wide object store, built once from settings on first use."""

from __future__ import annotations

from functools import lru_cache

from shared.settings import get_settings
from shared.storage.base import ObjectStore
from shared.storage.factory import store_from_url


@lru_cache
def get_object_store() -> ObjectStore:
    services = get_settings().services
    return store_from_url(
        services.storage_url, secret=services.secret_key.encode(), public_base_url=services.public_url
    )


def image_key(job_id: object, index: int, ext: str = "png") -> str:
    """Deterministic output keys: a re-run overwrites, never duplicates."""
    return f"jobs/{job_id}/{index}.{ext}"
