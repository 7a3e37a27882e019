"""Uploaded input images, owned by the API key owner who uploaded them.

A client uploads an image once (``POST /v1/uploads``) and names it in any number of jobs as
``upload:<id>``, instead of sending the same base64 in every request. The image is stored
already validated and re-encoded at ``uploads/<id>.png``; beside it ``uploads/<id>.json`` records
the owner, because the object store has no notion of owners and an id must not be usable by
anyone who learns it. Another owner's id reads exactly like an unknown one, so ids leak nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from api.submission.images import CheckedImage
from shared.errors import FieldError
from shared.storage.base import ObjectNotFoundError, ObjectStore

__all__ = ["UPLOAD_REF_PREFIX", "Upload", "is_upload_ref", "read_upload", "save_upload", "upload_key"]

UPLOAD_REF_PREFIX = "upload:"
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Upload:
    id: str
    ref: str
    width: int
    height: int


def upload_key(upload_id: str) -> str:
    return f"uploads/{upload_id}.png"


def _owner_key(upload_id: str) -> str:
    return f"uploads/{upload_id}.json"


def is_upload_ref(value: str) -> bool:
    return value.strip().startswith(UPLOAD_REF_PREFIX)


def save_upload(store: ObjectStore, owner: str, image: CheckedImage) -> Upload:
    """Store the image, then its owner record: an upload is usable only once both exist."""
    upload_id = uuid.uuid4().hex
    store.put(upload_key(upload_id), image.png, "image/png")
    record = {"owner": owner, "width": image.width, "height": image.height}
    try:
        store.put(_owner_key(upload_id), json.dumps(record).encode(), "application/json")
    except Exception:
        store.delete(upload_key(upload_id))
        raise
    return Upload(upload_id, UPLOAD_REF_PREFIX + upload_id, image.width, image.height)


def read_upload(store: ObjectStore, owner: str, ref: str, field: tuple[str | int, ...]) -> bytes:
    """The bytes of ``upload:<id>`` if ``owner`` uploaded it; FieldError otherwise."""
    upload_id = ref.strip()[len(UPLOAD_REF_PREFIX):]
    unknown = FieldError(field, f"unknown upload {ref.strip()!r}; upload images with POST /v1/uploads")
    if not _UPLOAD_ID.match(upload_id):
        raise unknown
    try:
        record = json.loads(store.get(_owner_key(upload_id)))
        if not isinstance(record, dict) or record.get("owner") != owner:
            raise unknown
        return store.get(upload_key(upload_id))
    except ObjectNotFoundError as exc:
        raise unknown from exc
