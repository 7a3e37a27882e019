"""Upload an input image once, then name it in jobs as ``upload:<id>`` instead of resending base64."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentKey, SettingsDep, StoreDep
from api.responses import INVALID, UNSUPPORTED_MEDIA
from api.submission.form_data import IMAGE_REQUEST_BODY, read_image_request
from api.submission.images import checked_png, decode_image, for_upload
from api.submission.uploads import Upload, save_upload
from shared.settings import Settings
from shared.storage.base import ObjectStore

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


class UploadView(BaseModel):
    id: str
    ref: str
    width: int
    height: int


def _store_upload(data: bytes, field: tuple[str, ...], owner: str, store: ObjectStore, settings: Settings) -> Upload:
    """Checked and re-encoded before it is stored, exactly like an init image sent inline."""
    image = decode_image(data, field, settings.limits.max_input_pixels)
    return save_upload(store, owner, checked_png(for_upload(image)))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadView, openapi_extra=IMAGE_REQUEST_BODY,
             responses={**UNSUPPORTED_MEDIA, **INVALID})
async def create_upload(request: Request, key: CurrentKey, settings: SettingsDep, store: StoreDep) -> UploadView:
    """Multipart form data (field ``file``) or JSON ``{"image": "<base64>"}``; usable by this key's owner only."""
    data, field = await read_image_request(request, settings.limits.max_upload_bytes)
    upload = await run_in_threadpool(_store_upload, data, field, key.owner, store, settings)
    return UploadView(id=upload.id, ref=upload.ref, width=upload.width, height=upload.height)
