"""``POST /sdapi/v1/txt2img`` and ``img2img``: submit a farm job, wait for it, answer like the WebUI.

The handler is async and waits with ``asyncio.sleep`` between short status reads, so a slow job
holds no worker thread; many WebUI clients can wait at once while the farm renders in parallel.
If the wait times out the job keeps running and stays reachable at ``/v1/jobs/{id}``.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.limits import SDAPI_CREATE_LIMITS
from api.sdapi.auth import SdapiKey
from api.sdapi.info import build_info, info_json
from api.sdapi.options import job_defaults, read_options
from api.sdapi.requests import (
    Img2ImgBody,
    Txt2ImgBody,
    WebuiBody,
    controlnet_of,
    to_farm_request,
    unsupported_features,
)
from api.sdapi.submit import create_job_from_request, job_status
from shared.db.models import ApiKey
from shared.db.session import get_session_factory
from shared.errors import FieldError
from shared.jobs import repository
from shared.jobs.states import ErrorType, JobStatus
from shared.settings import Settings
from shared.storage.base import ObjectStore

router = APIRouter()
USER_ERRORS = (ErrorType.INVALID_INPUT, ErrorType.MODEL_NOT_FOUND)


class GenerationResponse(BaseModel):
    images: list[str] | None
    parameters: dict[str, Any]
    info: str


def wait_timeout(settings: Settings) -> float:
    """How long a call waits: ``RENDERFARM_SDAPI_TIMEOUT``, else long enough for every retry of a job."""
    if settings.jobs.sdapi_timeout:
        return settings.jobs.sdapi_timeout
    return float(settings.jobs.job_time_limit * settings.jobs.max_attempts + 60)


def _submit(body: WebuiBody, key: ApiKey, settings: Settings, store: ObjectStore,
            warnings: list[str]) -> uuid.UUID:
    skipped: list[str] = []
    with get_session_factory()() as session:
        defaults, stale = job_defaults(read_options(session, key.id), settings)
        warnings.extend(stale)
        request = to_farm_request(body, defaults)
        try:
            job, _ = create_job_from_request(session, key, request, settings, store, skipped_loras=skipped)
        except FieldError as exc:
            raise controlnet_of(body).relocate(exc) from exc
    # The WebUI logs "Networks not found" and renders anyway; we say so in `info`.
    warnings.extend(f"LoRA {name!r} is not installed; its tag was not applied" for name in skipped)
    return job.id


def _status(job_id: uuid.UUID) -> JobStatus | None:
    with get_session_factory()() as session:
        return job_status(session, job_id)


async def wait_for_job(job_id: uuid.UUID, timeout: float) -> bool:
    deadline, poll = time.monotonic() + timeout, 0.05
    while True:
        current = await run_in_threadpool(_status, job_id)
        if current is None or current.is_terminal:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        poll = min(poll * 1.5, 0.5)


def _parameters(body: WebuiBody) -> dict[str, Any]:
    """The request echo; like the WebUI, input images are left out unless include_init_images."""
    echo = body.model_dump()
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        echo["init_images"], echo["mask"] = None, None
    return echo


def _answer(body: WebuiBody, job_id: uuid.UUID, settings: Settings, store: ObjectStore,
            warnings: list[str]) -> Response:
    with get_session_factory()() as session:
        job = repository.get_job(session, job_id)
        if job is None:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, detail=f"job {job_id} disappeared")
        headers = {"X-Renderfarm-Job-Id": str(job.id)}
        if job.status == JobStatus.FAILED:
            code = 422 if job.error_type in USER_ERRORS else 500
            return JSONResponse({"error": job.error_type, "detail": job.error_message, "job_id": str(job.id)},
                                status_code=code, headers=headers)
        if job.status == JobStatus.CANCELED:
            warnings = [*warnings, "the job was interrupted; no images were kept"]
        images = [base64.b64encode(store.get(image.key)).decode()
                  for image in sorted(job.images, key=lambda image: image.index)] if body.send_images else []
        info = build_info(body, job, settings, warnings)
    answer = GenerationResponse(images=images, parameters=_parameters(body), info=info_json(info))
    return JSONResponse(answer.model_dump(), headers=headers)


async def generate(body: WebuiBody, key: ApiKey, settings: Settings, store: ObjectStore) -> Response:
    """Checks (422 before anything is stored), a normal job, the wait, the WebUI's answer."""
    warnings = unsupported_features(body)
    job_id = await run_in_threadpool(_submit, body, key, settings, store, warnings)
    timeout = wait_timeout(settings)
    if not await wait_for_job(job_id, timeout):
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT,
                            detail=f"job {job_id} did not finish within {timeout:.0f}s; it keeps running: "
                                   f"GET /v1/jobs/{job_id}", headers={"X-Renderfarm-Job-Id": str(job_id)})
    return await run_in_threadpool(_answer, body, job_id, settings, store, warnings)


@router.post("/txt2img", response_model=GenerationResponse, dependencies=SDAPI_CREATE_LIMITS)
async def txt2img(body: Txt2ImgBody, key: SdapiKey, settings: SettingsDep, store: StoreDep) -> Response:
    return await generate(body, key, settings, store)


@router.post("/img2img", response_model=GenerationResponse, dependencies=SDAPI_CREATE_LIMITS)
async def img2img(body: Img2ImgBody, key: SdapiKey, settings: SettingsDep, store: StoreDep) -> Response:
    return await generate(body, key, settings, store)
