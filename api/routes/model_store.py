"""The shared model store over HTTP (issue 19): upload a model file, list, rename and delete the store's entries.

``POST /v1/models`` takes multipart form data: the file as the part ``file``, its ``kind`` (checkpoint, lora, vae,
embedding) and optionally its ``name`` inside that kind's folder (else the uploaded file's name). The upload is
spooled to disk (never whole in memory), checked as the registry checks any file (safetensors header, and a
checkpoint's architecture; pickles are refused by name, unopened), stored in the object store by its SHA-256 and
registered: every API process lists it within a second, and a worker that lacks it pulls it for a job that names it.
Admin keys, and keys with the model permission (``renderfarm-admin create-key --models``), may change the store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import AdminKey, CurrentKey, SessionDep, SettingsDep, StoreDep
from api.responses import BAD_BODY, INVALID, UNSUPPORTED_MEDIA, ErrorView
from api.submission.multipart import spooled_form
from shared.db.models import ApiKey, ModelFile
from shared.db.session import get_session_factory
from shared.errors import FieldError
from shared.models.store_files import add_file, delete_file, rename_file
from shared.models.store_registry import KIND_FOLDERS, ModelRecord, NameTakenError, check_kind, check_name, list_records
from shared.models.url_import import ImportTooLargeError, fetch_to
from shared.settings import Settings
from shared.storage.base import ObjectStore

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "kind"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "the .safetensors file (an upscaler: also .pth/.pt, read by its opcodes)"},
                "kind": {"type": "string", "enum": list(KIND_FOLDERS)},
                "name": {"type": "string", "description": "its name inside the kind's folder (default: the file's "
                                                          "name), e.g. 'styles/ink.safetensors'; an upscaler's "
                                                          "starts with its folder ('RealESRGAN/x.pth'; default "
                                                          "ESRGAN/)"},
            },
        }}},
    }
}
FileId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the entry's id (GET /v1/models/files)")]
NO_ENTRY: dict[int | str, dict[str, Any]] = {404: {"model": ErrorView, "description": "no such store entry"}}
TAKEN: dict[int | str, dict[str, Any]] = {409: {"model": ErrorView, "description": "another file has that name"}}
TOO_LARGE: dict[int | str, dict[str, Any]] = {413: {"model": ErrorView, "description": "the file is too large"}}
MANAGERS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorView, "description": "needs an admin key or a key with the model permission"}}
ADMINS: dict[int | str, dict[str, Any]] = {403: {"model": ErrorView, "description": "needs an admin key"}}


class StoreFileView(BaseModel):
    id: int
    kind: str
    name: str = Field(description="the file's path inside its kind's folder")
    file: str = Field(description="the file's path inside the models folder")
    sha256: str
    hash: str = Field(description="the WebUI's short hash: 10 hex (checkpoints, VAEs), 12 hex (LoRAs, embeddings)")
    legacy_hash: str | None
    size: int
    architecture: str | None
    metadata: dict[str, str]
    stored: bool = Field(description="in the object store (false: registered from a models folder only)")
    source: str
    added_by: str
    added_at: datetime | None

    @classmethod
    def of(cls, record: ModelRecord) -> StoreFileView:
        short = record.lora_hash or record.sha256[:12] if record.kind in ("lora", "embedding") else record.short_hash
        assert record.id is not None
        return cls(id=record.id, kind=record.kind, name=record.name, file=record.relpath, sha256=record.sha256,
                   hash=short, legacy_hash=record.legacy_hash, size=record.size, architecture=record.architecture,
                   metadata={k: str(v) for k, v in record.metadata.items()}, stored=record.stored,
                   source=record.source, added_by=record.added_by, added_at=record.added_at)


class ImportBody(BaseModel):
    model_config = {"extra": "forbid"}
    url: str = Field(description="an http(s) URL of the .safetensors file; it must resolve to public addresses "
                                 "(RENDERFARM_MODEL_IMPORT_ALLOW_HOSTS exempts an operator's own hosts)")
    kind: str = Field(description=f"one of {', '.join(KIND_FOLDERS)}")
    name: str | None = Field(None, description="its name inside the kind's folder (default: the file name the "
                                               "server gives, else the URL's last path segment)")


class RenameBody(BaseModel):
    model_config = {"extra": "forbid"}
    name: str = Field(description="the new name inside the kind's folder, ending in .safetensors")


def require_model_manager(key: CurrentKey) -> ApiKey:
    if not (key.is_admin or key.can_manage_models):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            detail="changing the model store needs an admin key or a key with the model permission")
    return key


def _spool(upload: UploadFile, max_bytes: int) -> Path:
    """The upload copied to a file of its own (the form's spool file goes when the request ends)."""
    fd, name = tempfile.mkstemp(prefix="renderfarm-upload-", suffix=".safetensors")
    path = Path(name)
    try:
        with open(fd, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, 1 << 20)
        if path.stat().st_size > max_bytes:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the file is larger than {max_bytes} bytes")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _store(upload: UploadFile, kind: str, name: str, owner: str, store: ObjectStore, settings: Settings
           ) -> tuple[ModelRecord, bool]:
    path = _spool(upload, settings.models.model_upload_max_bytes)
    try:
        with get_session_factory()() as session:
            return add_file(session, store, path, kind, name, source="upload", added_by=owner)
    finally:
        path.unlink(missing_ok=True)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StoreFileView, openapi_extra=UPLOAD_BODY,
             responses={**INVALID, **UNSUPPORTED_MEDIA, **TAKEN, **TOO_LARGE, **MANAGERS, 400: BAD_BODY,
                        200: {"model": StoreFileView, "description": "the same file was already there"}})
async def upload_model(request: Request, settings: SettingsDep, store: StoreDep,
                       key: ApiKey = Depends(require_model_manager)) -> Any:
    """Add a model file to the shared store (multipart: ``file``, ``kind``, optional ``name``). 201 when added, 200
    when the same bytes were already registered under that name; 409 when another file has the name."""
    # the declared size may exceed the file's by the multipart framing
    form = await spooled_form(request, settings.models.model_upload_max_bytes + (1 << 20), 1,
                              "the parts file, kind and name")
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise FieldError(("body", "file"), "the part 'file' (the model file) is required")
        kind_value = form.get("kind")
        if not isinstance(kind_value, str):
            raise FieldError(("body", "kind"), f"the part 'kind' is required: one of {', '.join(KIND_FOLDERS)}")
        kind = check_kind(kind_value.strip())
        given = form.get("name")
        if given is not None and not isinstance(given, str):
            raise FieldError(("body", "name"), "name is text")
        name = check_name(given if given else Path(upload.filename or "").name,
                          ("body", "name") if given else ("body", "file"), kind)
        try:
            record, created = await run_in_threadpool(_store, upload, kind, name, key.owner, store, settings)
        except NameTakenError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    finally:
        await form.close()
    view = StoreFileView.of(record)
    if created:
        return view
    return JSONResponse(view.model_dump(mode="json"), status_code=status.HTTP_200_OK)


def _import(body: ImportBody, kind: str, owner: str, store: ObjectStore, settings: Settings
            ) -> tuple[ModelRecord, bool]:
    models = settings.models
    fd, temp = tempfile.mkstemp(prefix="renderfarm-import-", suffix=".safetensors")
    os.close(fd)
    path = Path(temp)
    try:
        try:
            served = fetch_to(body.url, path, max_bytes=models.model_upload_max_bytes,
                              allow_hosts=models.model_import_allow_hosts,
                              timeout=models.model_import_timeout_seconds)
        except ImportTooLargeError as exc:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=str(exc)) from exc
        name = check_name(body.name if body.name else served, ("body", "name"), kind)
        with get_session_factory()() as session:
            return add_file(session, store, path, kind, name, source="url", added_by=owner)
    finally:
        path.unlink(missing_ok=True)


@router.post("/import", status_code=status.HTTP_201_CREATED, response_model=StoreFileView,
             responses={**INVALID, **TAKEN, **TOO_LARGE, **ADMINS,
                        200: {"model": StoreFileView, "description": "the same file was already there"}})
def import_model(body: ImportBody, settings: SettingsDep, store: StoreDep, key: AdminKey) -> Any:
    """Add a model file to the shared store from a URL (admin). The URL passes the webhooks' SSRF guard, each
    redirect too; the file is then checked, stored and registered as an upload is. Answers when it is stored."""
    kind = check_kind(body.kind.strip(), ("body", "kind"))
    if body.name is not None:
        check_name(body.name, ("body", "name"), kind)
    try:
        record, created = _import(body, kind, key.owner, store, settings)
    except NameTakenError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    view = StoreFileView.of(record)
    if created:
        return view
    return JSONResponse(view.model_dump(mode="json"), status_code=status.HTTP_200_OK)


@router.get("/files", response_model=list[StoreFileView])
def list_store_files(key: CurrentKey, session: SessionDep,
                     kind: str | None = Query(None, description=f"one of {', '.join(KIND_FOLDERS)}")
                     ) -> list[StoreFileView]:
    """The model store's registry: every file the farm has, uploaded or registered from a models folder."""
    if kind is not None:
        check_kind(kind, ("query", "kind"))
    return [StoreFileView.of(record) for record in list_records(session, kind)]


def _row(session: Session, file_id: int) -> ModelFile:
    row = session.get(ModelFile, file_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"model store entry {file_id} not found")
    return row


@router.patch("/files/{file_id}", response_model=StoreFileView, responses={**NO_ENTRY, **TAKEN, **MANAGERS})
def rename_store_file(file_id: FileId, body: RenameBody, session: SessionDep,
                      key: ApiKey = Depends(require_model_manager)) -> StoreFileView:
    """Rename an entry inside its kind's folder."""
    try:
        return StoreFileView.of(rename_file(session, _row(session, file_id), body.name))
    except NameTakenError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc


@router.delete("/files/{file_id}", status_code=status.HTTP_204_NO_CONTENT, responses={**NO_ENTRY, **MANAGERS})
def delete_store_file(file_id: FileId, session: SessionDep, store: StoreDep,
                      key: ApiKey = Depends(require_model_manager)) -> None:
    """Remove an entry (and its stored bytes, unless another entry has the same content). Workers that pulled
    it keep their copy until their disk cache evicts it; new jobs cannot name it."""
    delete_file(session, store, _row(session, file_id))
