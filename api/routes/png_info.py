"""Read the generation parameters out of an image, like the WebUI's ``POST /sdapi/v1/png-info``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentKey, SettingsDep
from api.responses import INVALID, UNSUPPORTED_MEDIA
from api.submission.form_data import IMAGE_REQUEST_BODY, read_image_request
from api.submission.images import read_generation_info
from shared.webui.infotext import parse_infotext

router = APIRouter(prefix="/v1", tags=["png-info"])


class PngInfoView(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


@router.post("/png-info", response_model=PngInfoView, openapi_extra=IMAGE_REQUEST_BODY,
             responses={**UNSUPPORTED_MEDIA, **INVALID})
async def png_info(request: Request, key: CurrentKey, settings: SettingsDep) -> PngInfoView:
    """``info``: the infotext (PNG ``parameters`` chunk or JPEG/WebP EXIF UserComment); ``parameters``: it parsed.

    Paste ``info`` into a job's ``infotext`` field to render the same picture again.
    """
    data, field = await read_image_request(request, settings.limits.max_upload_bytes)
    info, items = await run_in_threadpool(read_generation_info, data, field, settings.limits.max_input_pixels)
    return PngInfoView(info=info, items=items, parameters=parse_infotext(info))
