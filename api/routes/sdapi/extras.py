"""``POST /sdapi/v1/extra-single-image`` and ``extra-batch-images``: the WebUI's Extras API on farm upscale jobs.

The request is the WebUI's (``ExtrasBaseRequest`` in ``modules/api/models.py``); it becomes one upscale job (all
of a batch's images in one job), waited for like txt2img, and answered as the WebUI answers: the images in base64
and ``html_info``, the last image's postprocessing text as HTML (``plaintext_to_html``).
"""

from __future__ import annotations

import base64
import html
import uuid
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.limits import SDAPI_CREATE_LIMITS
from api.routes.sdapi.generate import USER_ERRORS, wait_for_job, wait_timeout
from api.sdapi.auth import SdapiKey
from api.submission.submit import submit_upscale
from shared.db.models import ApiKey
from shared.db.session import get_session_factory
from shared.jobs import repository
from shared.jobs.schemas import UpscaleRequest
from shared.jobs.states import JobStatus
from shared.settings import Settings
from shared.storage.base import ObjectStore

router = APIRouter()


class ExtrasBase(BaseModel):
    """``ExtrasBaseRequest``: the WebUI's names and defaults; ``upscale_first`` and ``show_extras_results`` are
    accepted and, as in the WebUI's API, change nothing."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0)
    upscaling_resize: float = Field(2.0, gt=0.0, le=8.0)
    upscaling_resize_w: int = Field(512, ge=1, le=16384)
    upscaling_resize_h: int = Field(512, ge=1, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", max_length=500)
    upscaler_2: str = Field("None", max_length=500)
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    upscale_first: bool = False

    def farm_fields(self) -> dict[str, Any]:
        return self.model_dump(include=set(ExtrasBase.model_fields) - {"show_extras_results", "upscale_first"})


class ExtrasSingleImageBody(ExtrasBase):
    image: str = Field("", max_length=64 * 1024 * 1024, description="base64 or a data URL")


class FileData(BaseModel):
    data: str = Field(max_length=64 * 1024 * 1024, description="base64 or a data URL")
    name: str = Field(max_length=1000)


class ExtrasBatchImagesBody(ExtrasBase):
    imageList: list[FileData] = Field(min_length=1, max_length=256)  # noqa: N815 (the WebUI's name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def plaintext_to_html(text: str) -> str:
    """``ui_common.plaintext_to_html``: escaped lines joined by ``<br>``, in a paragraph."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _submit(request: UpscaleRequest, key: ApiKey, settings: Settings, store: ObjectStore) -> uuid.UUID:
    with get_session_factory()() as session:
        return submit_upscale(session, key, request, settings, store).job.id


def _answer(job_id: uuid.UUID, store: ObjectStore, single: bool) -> Response:
    with get_session_factory()() as session:
        job = repository.get_job(session, job_id)
        if job is None:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, detail=f"job {job_id} disappeared")
        headers = {"X-Renderfarm-Job-Id": str(job.id)}
        if job.status != JobStatus.SUCCEEDED:
            code = 422 if job.error_type in USER_ERRORS else 500
            return JSONResponse({"error": job.error_type or job.status, "detail": job.error_message,
                                 "job_id": str(job.id)}, status_code=code, headers=headers)
        ordered = sorted(job.images, key=lambda image: image.index)
        images = [base64.b64encode(store.get(image.key)).decode() for image in ordered]
        info = plaintext_to_html(ordered[-1].infotext or "") if ordered else plaintext_to_html("")
    answer: dict[str, Any] = {"html_info": info}
    answer.update({"image": images[0]} if single else {"images": images})
    return JSONResponse(answer, headers=headers)


async def _extras(request: UpscaleRequest, key: ApiKey, settings: Settings, store: ObjectStore,
                  single: bool) -> Response:
    job_id = await run_in_threadpool(_submit, request, key, settings, store)
    timeout = wait_timeout(settings)
    if not await wait_for_job(job_id, timeout):
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT,
                            detail=f"job {job_id} did not finish within {timeout:.0f}s; it keeps running: "
                                   f"GET /v1/jobs/{job_id}", headers={"X-Renderfarm-Job-Id": str(job_id)})
    return await run_in_threadpool(_answer, job_id, store, single)


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse, dependencies=SDAPI_CREATE_LIMITS)
async def extra_single_image(body: ExtrasSingleImageBody, key: SdapiKey, settings: SettingsDep,
                             store: StoreDep) -> Response:
    request = UpscaleRequest(mode="upscale", image=body.image, **body.farm_fields())
    return await _extras(request, key, settings, store, single=True)


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse, dependencies=SDAPI_CREATE_LIMITS)
async def extra_batch_images(body: ExtrasBatchImagesBody, key: SdapiKey, settings: SettingsDep,
                             store: StoreDep) -> Response:
    request = UpscaleRequest(mode="upscale", images=[item.data for item in body.imageList], **body.farm_fields())
    return await _extras(request, key, settings, store, single=False)
