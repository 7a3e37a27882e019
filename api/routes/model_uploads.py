"""Resumable uploads into the model store (issue 19): for multi-GB checkpoints over links that drop.

1. ``POST /v1/models/uploads`` ``{"kind", "name", "size"}`` starts one (201, with its ``id``).
2. ``PATCH /v1/models/uploads/{id}`` with ``Upload-Offset: <bytes received so far>`` and a chunk as the raw
   body, as many times as it takes (each answer carries the new ``Upload-Offset``). A chunk is counted whole or
   not at all; after a dropped connection, ``GET /v1/models/uploads/{id}`` says where to go on from.
3. The chunk that reaches ``size`` completes it: the file is checked, stored and registered as ``POST
   /v1/models`` does, and that answer (201 added, 200 same bytes, 409 name taken, 422 refused) ends the upload.

``DELETE /v1/models/uploads/{id}`` abandons one. The state is in Postgres and the chunks in the object store, so
any API replica takes any request. (The protocol follows tus's core: offsets in a header, one PATCH per chunk.)
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StoreDep
from api.responses import INVALID, ErrorView
from api.routes.model_store import MANAGERS, TOO_LARGE, StoreFileView, require_model_manager
from shared.db.models import ApiKey, ModelUpload
from shared.db.session import get_session_factory
from shared.models.store_registry import KIND_FOLDERS, NameTakenError
from shared.models.store_uploads import UploadOffsetError, append, begin, discard, finish
from shared.storage.base import ObjectStore

router = APIRouter(prefix="/v1/models/uploads", tags=["models"])

NO_UPLOAD: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorView, "description": "no such upload of yours"}, **MANAGERS}
WRONG_OFFSET: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorView, "description": "the chunk's Upload-Offset is not where the upload is (or, on the "
                                             "last chunk, another file has the name)"}}
CHUNK_BODY = {"requestBody": {"required": True, "content": {"application/offset+octet-stream": {
    "schema": {"type": "string", "format": "binary"}}, "application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


class BeginBody(BaseModel):
    model_config = {"extra": "forbid"}
    kind: str = Field(description=f"one of {', '.join(KIND_FOLDERS)}")
    name: str = Field(description="its name inside the kind's folder, ending in .safetensors")
    size: int = Field(description="the whole file's size in bytes")


class UploadView(BaseModel):
    id: uuid.UUID
    kind: str
    name: str
    size: int
    offset: int = Field(description="bytes received so far: the next chunk's Upload-Offset")

    @classmethod
    def of(cls, row: ModelUpload) -> UploadView:
        return cls(id=row.id, kind=row.kind, name=row.name, size=row.size, offset=row.received)


def _mine(session: Session, upload_id: uuid.UUID, key: ApiKey) -> ModelUpload:
    row = session.get(ModelUpload, upload_id)
    if row is None or (row.owner != key.owner and not key.is_admin):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"upload {upload_id} not found")
    return row


def _answer(row: ModelUpload, response: Response) -> UploadView:
    response.headers["Upload-Offset"] = str(row.received)
    response.headers["Upload-Length"] = str(row.size)
    return UploadView.of(row)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadView, responses={**INVALID, **MANAGERS})
def begin_upload(body: BeginBody, response: Response, session: SessionDep, store: StoreDep, settings: SettingsDep,
                 key: ApiKey = Depends(require_model_manager)) -> UploadView:
    """Start a resumable upload of a model file; send its chunks with PATCH."""
    row = begin(session, store, key.owner, body.kind.strip(), body.name, body.size,
                settings.models.model_upload_max_bytes)
    return _answer(row, response)


@router.get("/{upload_id}", response_model=UploadView, responses=NO_UPLOAD)
def get_upload(upload_id: uuid.UUID, response: Response, session: SessionDep,
               key: ApiKey = Depends(require_model_manager)) -> UploadView:
    """Where an upload is: the next chunk starts at ``offset`` (also the ``Upload-Offset`` header)."""
    return _answer(_mine(session, upload_id, key), response)


async def _spool(request: Request, room: int) -> Path:
    """The request's body in a file of its own, refused past ``room`` bytes (the rest of the declared size)."""
    fd, name = tempfile.mkstemp(prefix="renderfarm-chunk-")
    path, written = Path(name), 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for piece in request.stream():
                written += len(piece)
                if written > room:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                                        detail=f"the chunk runs past the upload's declared size ({room} bytes left)")
                out.write(piece)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _append_and_maybe_finish(upload_id: uuid.UUID, offset: int, chunk: Path, store: ObjectStore
                             ) -> tuple[ModelUpload, Any]:
    row = append(get_session_factory(), store, upload_id, offset, chunk)
    if row.received < row.size:
        return row, None
    with get_session_factory()() as session:
        return row, finish(session, store, row)


@router.patch("/{upload_id}", response_model=UploadView, openapi_extra=CHUNK_BODY,
              responses={**NO_UPLOAD, **WRONG_OFFSET, **INVALID, **TOO_LARGE,
                         201: {"model": StoreFileView, "description": "the last chunk: the file was added"}})
async def send_chunk(upload_id: uuid.UUID, request: Request, response: Response, store: StoreDep,
                     upload_offset: int = Header(..., alias="Upload-Offset", ge=0,
                                                 description="where this chunk starts: the bytes received so far"),
                     key: ApiKey = Depends(require_model_manager)) -> Any:
    """Append a chunk (the raw body) at ``Upload-Offset``. The chunk that completes the file answers as ``POST
    /v1/models`` does (201 with the entry, 200 when those bytes were there, 409, 422)."""
    def lookup() -> ModelUpload:
        with get_session_factory()() as session:
            row = _mine(session, upload_id, key)
            session.expunge(row)
            return row

    row = await run_in_threadpool(lookup)
    if upload_offset != row.received:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(UploadOffsetError(row.received)),
                            headers={"Upload-Offset": str(row.received)})
    chunk = await _spool(request, row.size - row.received)
    try:
        row, added = await run_in_threadpool(_append_and_maybe_finish, upload_id, upload_offset, chunk, store)
    except UploadOffsetError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc),
                            headers={"Upload-Offset": str(exc.offset)}) from exc
    except NameTakenError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"upload {upload_id} not found") from exc
    finally:
        chunk.unlink(missing_ok=True)
    if added is None:
        return _answer(row, response)
    record, created = added
    headers = {"Upload-Offset": str(row.received)}
    return JSONResponse(StoreFileView.of(record).model_dump(mode="json"), headers=headers,
                        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@router.delete("/{upload_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NO_UPLOAD)
def abandon_upload(upload_id: uuid.UUID, session: SessionDep, store: StoreDep,
                   key: ApiKey = Depends(require_model_manager)) -> None:
    """Abandon an upload: its chunks and its record go."""
    discard(session, store, _mine(session, upload_id, key))
