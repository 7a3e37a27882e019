"""``POST /sdapi/v1/png-info`` with the WebUI's JSON body (``{"image": base64}``); same reader as /v1/png-info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep
from api.sdapi.auth import SdapiKey
from api.submission.images import decode_base64_image, read_generation_info
from shared.settings import Settings
from shared.webui.infotext import parse_infotext

router = APIRouter()


class PngInfoBody(BaseModel):
    image: str = ""


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


def _read(image: str, settings: Settings) -> PngInfoResponse:
    data = decode_base64_image(image, ("body", "image"), settings.limits.max_upload_bytes)
    info, items = read_generation_info(data, ("body", "image"), settings.limits.max_input_pixels)
    return PngInfoResponse(info=info, items=items, parameters=parse_infotext(info) if info else {})


@router.post("/png-info", response_model=PngInfoResponse)
async def png_info(body: PngInfoBody, key: SdapiKey, settings: SettingsDep) -> PngInfoResponse:
    """An empty image gives an empty answer, as in the WebUI."""
    if not body.image.strip():
        return PngInfoResponse(info="", items={}, parameters={})
    return await run_in_threadpool(_read, body.image, settings)
