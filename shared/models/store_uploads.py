"""Resumable uploads of model files (``/v1/models/uploads``, issue 19): multi-GB checkpoints over links that drop.

An upload is a row (``model_uploads``: kind, name, declared size, bytes received, its parts) and its chunks, each
an object in the store (``model-uploads/<id>/<offset>-<token>``), so any API replica may take the next chunk.
A chunk is appended only at the offset received so far (compare-and-set on the row: two clients sending the same
chunk cannot both land), and only whole: a chunk whose connection dropped is not counted, and the client sends it
again from the offset the upload reports. When the declared size is reached the chunks are joined into one file,
checked, stored and registered exactly as a single-request upload (:func:`shared.models.store_files.add_file`),
and the chunks and the row go; a refused file leaves nothing behind either. Uploads untouched for
:data:`ABANDONED_AFTER` are discarded when the next upload begins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import ModelUpload
from shared.errors import FieldError
from shared.models.store_files import add_file
from shared.models.store_registry import ModelRecord, check_kind, check_name
from shared.storage.base import ObjectStore, StorageError

log = logging.getLogger(__name__)

PREFIX = "model-uploads"
ABANDONED_AFTER = timedelta(days=1)


class UploadOffsetError(ValueError):
    """A chunk was sent for another offset than the upload has reached."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"this upload has received {offset} bytes; send the chunk that starts there "
                         f"(Upload-Offset: {offset})")
        self.offset = offset


def begin(session: Session, store: ObjectStore, owner: str, kind: str, name: str, size: int, max_bytes: int
          ) -> ModelUpload:
    """Start an upload of ``size`` bytes; commits. Raises FieldError naming the field."""
    check_kind(kind)
    name = check_name(name, kind=kind)
    if size <= 0 or size > max_bytes:
        raise FieldError(("body", "size"), f"size must be between 1 and {max_bytes} bytes, got {size}")
    for stale in session.scalars(select(ModelUpload).where(ModelUpload.updated_at < utcnow() - ABANDONED_AFTER)):
        discard(session, store, stale, commit=False)
    row = ModelUpload(id=uuid.uuid4(), owner=owner, kind=kind, name=name, size=size, received=0, parts=[])
    session.add(row)
    session.commit()
    return row


def append(session_factory: Callable[[], Session], store: ObjectStore, upload_id: uuid.UUID, offset: int,
           chunk: Path) -> ModelUpload:
    """Store ``chunk`` as the part at ``offset`` and count it (the row is returned detached, committed). Raises
    UploadOffsetError when the upload is elsewhere, FieldError when the chunk runs past the declared size."""
    length = chunk.stat().st_size
    with session_factory() as session:
        row = session.get(ModelUpload, upload_id)
        if row is None:
            raise LookupError(upload_id)
        if offset != row.received:
            raise UploadOffsetError(row.received)
        if offset + length > row.size:
            raise FieldError(("body",), f"the chunk runs to byte {offset + length}, past the upload's declared size "
                                        f"{row.size}")
    key = f"{PREFIX}/{upload_id}/{offset}-{uuid.uuid4().hex[:8]}"
    store.put_file(key, chunk, "application/octet-stream")
    with session_factory() as session:
        row = session.scalar(select(ModelUpload).where(ModelUpload.id == upload_id).with_for_update())
        if row is None or row.received != offset:  # another request landed this offset first, or it was aborted
            session.rollback()
            _delete_quietly(store, key)
            if row is None:
                raise LookupError(upload_id)
            raise UploadOffsetError(row.received)
        row.parts = [*row.parts, [offset, length, key]]
        row.received = offset + length
        row.updated_at = utcnow()
        session.commit()
        session.expunge(row)
        return row


@contextlib.contextmanager
def _joined(store: ObjectStore, row: ModelUpload) -> Iterator[Path]:
    """The upload's chunks joined into one temporary file (removed after the block)."""
    fd, name = tempfile.mkstemp(prefix="renderfarm-upload-", suffix=".safetensors")
    os.close(fd)
    joined, part = Path(name), Path(name + ".part")
    try:
        with open(joined, "wb") as out:
            for _offset, _length, key in row.parts:
                store.get_file(key, part)
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        yield joined
    finally:
        part.unlink(missing_ok=True)
        joined.unlink(missing_ok=True)


def finish(session: Session, store: ObjectStore, row: ModelUpload) -> tuple[ModelRecord, bool]:
    """Join, check, store and register a complete upload, then discard its chunks and row, whatever the check
    said (a refused file is not kept); commits. Raises FieldError or NameTakenError as :func:`add_file` does."""
    try:
        with _joined(store, row) as path:
            return add_file(session, store, path, row.kind, row.name, source="upload", added_by=row.owner)
    finally:
        session.rollback()
        current = session.get(ModelUpload, row.id)
        if current is not None:
            discard(session, store, current)


def discard(session: Session, store: ObjectStore, row: ModelUpload, commit: bool = True) -> None:
    """Drop an upload: its chunks, then its row."""
    for _offset, _length, key in row.parts:
        _delete_quietly(store, key)
    session.delete(row)
    if commit:
        session.commit()


def _delete_quietly(store: ObjectStore, key: str) -> None:
    try:
        store.delete(key)
    except StorageError as exc:  # an orphaned chunk costs space, not correctness
        log.warning("could not delete the upload chunk %s: %s", key, exc)
