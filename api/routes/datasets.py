"""Training datasets (issue 15): images with optional same-named ``.txt`` captions, checked and stored once, then
named by trainings through their ``id``.

``POST /v1/datasets`` takes multipart form data: one zip as the part ``file``, or several ``file`` parts (images
and captions), and an optional ``name``. Everything is checked before a byte of it is unpacked or stored
(:mod:`api.submission.datasets`); a refusal is a 422 whose ``loc`` names the entry, and nothing is kept. Images
are re-encoded as PNG without metadata (what a training reads) under ``datasets/<id>/`` in the object store.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import CurrentKey, SessionDep, SettingsDep, StoreDep
from api.responses import BAD_BODY, INVALID, UNSUPPORTED_MEDIA, ErrorView
from api.submission.datasets import DatasetImage, DatasetLimits, read_files, read_zip
from api.submission.multipart import spooled_form
from shared.db.models import Dataset
from shared.db.session import get_session_factory
from shared.errors import FieldError
from shared.storage.base import ObjectStore, StorageError

router = APIRouter(prefix="/v1/datasets", tags=["training"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one .zip of images and same-named .txt captions, or the images and captions"},
        "name": {"type": "string", "maxLength": 200, "description": "a label for the dataset"},
    },
}}}}}
NO_DATASET: dict[int | str, dict[str, Any]] = {404: {"model": ErrorView, "description": "no such dataset of yours"}}
TOO_LARGE: dict[int | str, dict[str, Any]] = {413: {"model": ErrorView, "description": "the request is too large"}}
MAX_PARTS = 20_000


class DatasetItemView(BaseModel):
    file: str = Field(description="its name in the upload (the zip's path)")
    width: int
    height: int
    caption: str | None


class DatasetView(BaseModel):
    id: uuid.UUID
    name: str
    image_count: int
    bytes: int = Field(description="the stored PNGs' size")
    created_at: datetime | None
    items: list[DatasetItemView] | None = Field(None, description="the images in order (GET of one dataset only)")

    @classmethod
    def of(cls, row: Dataset, items: bool) -> DatasetView:
        return cls(id=row.id, name=row.name, image_count=row.image_count, bytes=row.bytes, created_at=row.created_at,
                   items=[DatasetItemView(**{k: item[k] for k in ("file", "width", "height", "caption")})
                          for item in row.items] if items else None)


class DatasetPage(BaseModel):
    datasets: list[DatasetView]
    total: int


def _store(owner: str, name: str, images: list[DatasetImage], store: ObjectStore) -> Dataset:
    """The images in the object store, then the row; a failure part way removes what was written."""
    dataset_id = uuid.uuid4()
    written: list[str] = []
    try:
        items = []
        for index, image in enumerate(images):
            key = f"datasets/{dataset_id}/{index}.png"
            store.put(key, image.png, "image/png")
            written.append(key)
            items.append({"file": image.name, "key": key, "width": image.width, "height": image.height,
                          "caption": image.caption})
        row = Dataset(id=dataset_id, owner=owner, name=name, image_count=len(images),
                      bytes=sum(len(image.png) for image in images), items=items)
        with get_session_factory()() as session:
            session.add(row)
            session.commit()
            session.refresh(row)
            session.expunge(row)
        return row
    except BaseException:
        for key in written:
            try:
                store.delete(key)
            except StorageError:
                pass
        raise


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetView, openapi_extra=UPLOAD_BODY,
             responses={**INVALID, **UNSUPPORTED_MEDIA, **TOO_LARGE, 400: BAD_BODY})
async def create_dataset(request: Request, key: CurrentKey, settings: SettingsDep, store: StoreDep) -> DatasetView:
    """Check and store a training dataset: one zip, or images and ``.txt`` captions, as multipart parts ``file``."""
    limits = settings.limits
    form = await spooled_form(request, limits.dataset_max_upload_bytes, MAX_PARTS,
                              "one zip, or images and captions, as parts 'file'")
    try:
        parts = [part for part in form.getlist("file") if isinstance(part, UploadFile)]
        if not parts:
            raise FieldError(("body", "file"), "send the dataset as the part 'file': one .zip, or images and captions")
        name = form.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise FieldError(("body", "name"), "name is text of at most 200 characters")
        bounds = DatasetLimits(limits.dataset_max_images, limits.dataset_max_unpacked_bytes,
                               limits.dataset_max_compression_ratio, limits.max_input_pixels)
        is_zip = len(parts) == 1 and (parts[0].filename or "").lower().endswith(".zip")

        def check() -> list[DatasetImage]:
            if is_zip:
                return read_zip(parts[0].file, bounds)
            total = 0
            files = []
            for part in parts:
                data = part.file.read(limits.dataset_max_unpacked_bytes - total + 1)
                total += len(data)
                if total > limits.dataset_max_unpacked_bytes:
                    raise FieldError(("body", "file", part.filename or ""),
                                     f"the dataset is larger than {limits.dataset_max_unpacked_bytes} bytes")
                files.append((part.filename or "", data))
            return read_files(files, bounds)

        images = await run_in_threadpool(check)
        label = name or ((parts[0].filename or "dataset").rsplit(".", 1)[0] if is_zip else "dataset")
        row = await run_in_threadpool(_store, key.owner, label[:200], images, store)
    finally:
        await form.close()
    return DatasetView.of(row, items=True)


@router.get("", response_model=DatasetPage)
def list_datasets(key: CurrentKey, session: SessionDep, limit: int = Query(50, ge=1, le=500),
                  offset: int = Query(0, ge=0, le=1_000_000)) -> DatasetPage:
    """The caller's datasets, newest first."""
    mine = select(Dataset).where(Dataset.owner == key.owner)
    rows = session.scalars(mine.order_by(Dataset.created_at.desc()).limit(limit).offset(offset)).all()
    total = session.scalar(select(func.count()).select_from(mine.subquery())) or 0
    return DatasetPage(datasets=[DatasetView.of(row, items=False) for row in rows], total=total)


def _mine(session: Any, dataset_id: uuid.UUID, owner: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.owner != owner:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"dataset {dataset_id} not found")
    return row


@router.get("/{dataset_id}", response_model=DatasetView, responses=NO_DATASET)
def get_dataset(dataset_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> DatasetView:
    """One of the caller's datasets with its images and captions."""
    return DatasetView.of(_mine(session, dataset_id, key.owner), items=True)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NO_DATASET)
def delete_dataset(dataset_id: uuid.UUID, key: CurrentKey, session: SessionDep, store: StoreDep) -> None:
    """Remove a dataset: its row, then its images."""
    row = _mine(session, dataset_id, key.owner)
    keys = [item["key"] for item in row.items]
    session.delete(row)
    session.commit()
    for stored in keys:
        try:
            store.delete(stored)
        except StorageError:
            pass
