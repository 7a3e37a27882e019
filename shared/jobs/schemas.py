"""Request and response shapes of the job API, in the WebUI's parameter names."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import FieldError
from shared.jobs.states import JobStatus
from shared.samplers import resolve_sampler
from shared.settings import Settings

MAX_SEED = 2**32 - 1


class Txt2ImgRequest(BaseModel):
    """A txt2img job. Unknown fields are refused so that nothing a user sent is silently dropped."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["txt2img"] = "txt2img"
    prompt: str = Field("", max_length=20000)
    negative_prompt: str = Field("", max_length=20000)
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    sampler_name: str = "Euler"
    scheduler: str = "Automatic"
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed, recorded on the job")
    width: int = Field(512, ge=64)
    height: int = Field(512, ge=64)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1, description="batch count")
    model: str | None = Field(None, description="checkpoint name; default: the farm's default model")
    webhook_url: str | None = Field(None, max_length=2000, description="http(s) URL told about this job's events")
    webhook_events: list[str] | None = Field(
        None, description="subset of queued, started, progress, succeeded, failed, canceled; default: terminal ones"
    )


def check_limits(req: Txt2ImgRequest, settings: Settings) -> None:
    """Rules that depend on the farm's configuration; raises FieldError naming the field."""
    for name in ("width", "height"):
        value = getattr(req, name)
        if value % 8:
            raise FieldError(("body", name), f"{name} must be a multiple of 8, got {value}")
        if value > settings.max_side:
            raise FieldError(("body", name), f"{name} must be at most {settings.max_side}, got {value}")
    if req.width * req.height > settings.max_pixels:
        raise FieldError(
            ("body", "width"),
            f"width x height = {req.width * req.height} pixels exceeds the limit of {settings.max_pixels}",
        )
    if req.steps > settings.max_steps:
        raise FieldError(("body", "steps"), f"steps must be between 1 and {settings.max_steps}")
    if req.batch_size > settings.max_batch_size:
        raise FieldError(("body", "batch_size"), f"batch_size must be between 1 and {settings.max_batch_size}")
    if req.n_iter > settings.max_n_iter:
        raise FieldError(("body", "n_iter"), f"n_iter must be between 1 and {settings.max_n_iter}")
    if req.batch_size * req.n_iter > settings.max_images_per_job:
        raise FieldError(
            ("body", "n_iter"),
            f"batch_size x n_iter must be at most {settings.max_images_per_job} images per job",
        )


def resolve_params(req: Txt2ImgRequest, model_name: str) -> dict[str, Any]:
    """The immutable parameter object a worker renders from: every default and the seed made explicit."""
    sampler = resolve_sampler(req.sampler_name, req.scheduler)
    seed = req.seed if req.seed != -1 else secrets.randbelow(MAX_SEED)
    return {
        "mode": "txt2img",
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "steps": req.steps,
        "cfg_scale": req.cfg_scale,
        "sampler_name": sampler.sampler_name,
        "scheduler": sampler.schedule_type,
        "seed": seed,
        "width": req.width,
        "height": req.height,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "model": model_name,
    }


class ImageView(BaseModel):
    index: int
    url: str
    seed: int
    width: int
    height: int
    infotext: str


class ErrorView(BaseModel):
    type: str
    message: str


class JobView(BaseModel):
    id: uuid.UUID
    status: JobStatus
    status_seq: int
    mode: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    params: dict[str, Any]
    model: str
    model_hash: str | None
    seeds: list[int]
    attempt: int
    progress: float = Field(description="0..1 over every denoising step of the job")
    current_step: int
    total_steps: int
    eta_seconds: float | None = Field(description="estimated seconds until done, while running")
    queue_position: int | None = Field(description="1 = next to run, while queued")
    images: list[ImageView]
    error: ErrorView | None
    links: dict[str, str]


class JobListView(BaseModel):
    jobs: list[JobView]
    total: int
    limit: int
    offset: int
