"""Request and response shapes of the job API, in the WebUI's parameter names.

A request is what a user typed; ``resolve_params`` turns it into the immutable parameter dict a
worker renders from, with every default and every random choice made explicit, so a job means the
same thing on every worker and on every retry. Turning an infotext or ``override_settings`` into
request fields happens before, in :mod:`api.submission.params`.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.controlnet.units import UnitRequest
from shared.errors import FieldError
from shared.jobs.contract import HIRES_DENOISING, IMG2IMG_DENOISING
from shared.jobs.states import JobStatus
from shared.prompt_dictionary.choices import PromptBuilderRequest
from shared.settings import Settings
from shared.webui.samplers import SamplerChoice, resolve_sampler
from shared.webui.styles import BUILTIN_STYLES_FILE, StyleBook, read_styles_csv

MAX_SEED = 2**32 - 1
# The events a job's webhook may subscribe to (the outbox's WEBHOOK_EVENTS).
WEBHOOK_EVENT_NAMES = ("queued", "started", "progress", "succeeded", "failed", "canceled")
# The WebUI's defaults: img2img's denoising slider, and txt2img's hires fix slider.
_PROMPT = Field("", max_length=20000)


def refuse_nul(value: Any) -> Any:
    """A NUL character (``\\u0000``) anywhere in a text value is refused: PostgreSQL cannot store it in a job
    row (JSONB) and PNG text chunks cannot carry it, and dropping it silently would change what the user
    sent. Applied to every field of the request models (``field_validator("*")``), nested values included."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    if isinstance(value, dict):
        for key, item in value.items():
            refuse_nul(key)
            refuse_nul(item)
    elif isinstance(value, list | tuple):
        for item in value:
            refuse_nul(item)
    return value


class LoraRequest(BaseModel):
    """A LoRA by name (file in models/Lora, with or without extension) and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=500)
    weight: float = Field(1.0, ge=-100.0, le=100.0, allow_inf_nan=False)


class Txt2ImgRequest(BaseModel):
    """A job (txt2img, or img2img when init images are given).

    Unknown fields are refused so that nothing a user sent is silently dropped.
    """

    # Floats must be finite: NaN or Infinity is no parameter, and a job row (JSONB) cannot store it.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _no_nul = field_validator("*", mode="before")(refuse_nul)

    mode: Literal["txt2img", "img2img"] = Field("txt2img", description="img2img is implied by init_images")
    prompt: str = _PROMPT
    negative_prompt: str = _PROMPT
    styles: list[str] = Field(default_factory=list, max_length=32, description="names from GET /v1/styles")
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    sampler_name: str = Field("Euler", max_length=100)
    scheduler: str = Field("Automatic", max_length=100)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed, recorded on the job")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="variation seed; -1 picks a random one")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_w: int = Field(-1, ge=-1)
    seed_resize_from_h: int = Field(-1, ge=-1)
    width: int = Field(512, ge=64)
    height: int = Field(512, ge=64)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1, description="batch count")
    model: str | None = Field(None, max_length=500, description="checkpoint name; default: the farm's default model")
    vae: str | None = Field(None, max_length=500, description="file in models/VAE; null, Automatic or None: the "
                                                              "checkpoint's own")
    loras: list[LoraRequest] = Field(default_factory=list, max_length=32,
                                     description="LoRAs besides the prompt's <lora:name:weight> tags")
    clip_skip: int = Field(1, ge=1, le=12)
    eta_noise_seed_delta: int = Field(0, ge=0, le=MAX_SEED, description="ENSD")
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0,
                                             description="default 0.75 for img2img, 0.7 for hires fix")
    # img2img and inpainting
    init_images: list[str] | None = Field(None, description="base64 images (data: prefix allowed) or upload:<id>")
    mask: str | None = Field(None, description="base64 image or upload:<id>; white = repaint")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(1, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(False, description="inpaint only the masked area, at full resolution")
    inpaint_full_res_padding: int = Field(32, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, "
                                                        "3 just resize (latent upscale)")
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=8.0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_upscaler: str = Field("Latent", max_length=500)
    hr_second_pass_steps: int = Field(0, ge=0, description="0: as many as the first pass")
    hr_prompt: str = Field("", max_length=20000, description="empty: the prompt")
    hr_negative_prompt: str = Field("", max_length=20000, description="empty: the negative prompt")
    hr_sampler_name: str | None = Field(None, max_length=100, description="null: the same sampler")
    hr_scheduler: str | None = Field(None, max_length=100, description="null: the same schedule type")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    restore_faces: bool = Field(False, description="GFPGAN face restoration on each image (models/GFPGAN/)")
    controlnet: list[UnitRequest] = Field(default_factory=list, max_length=8,
                                          description="ControlNet units (the extension's unit fields); a unit "
                                                      "without image on img2img uses the init image")
    # WebUI conveniences, turned into the fields above before anything else looks at the request
    prompt_builder: PromptBuilderRequest | None = Field(
        None, description="choices from GET /v1/prompt-dictionary (as POST /v1/prompts/build takes them): the built "
                          "prompt is the job's prompt, and a prompt sent too follows it on its own line; the built "
                          "negative prompt is used unless negative_prompt is set; a character's settings fill the "
                          "fields not given. Not with an infotext. The params record the resolved choices and seed"
    )
    infotext: str | None = Field(None, max_length=50000,
                                 description="a WebUI infotext; its values fill every field not given")
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers, eta_noise_seed_delta, "
                          "renderfarm_batch_invariant"
    )
    batch_invariant: bool = Field(False, description="render this job's images one at a time and never in a batch "
                                                     "with other jobs: image k is pixel-identical to a single job "
                                                     "with seed + k (default: batched, within the stated tolerance)")
    override_settings_restore_afterwards: bool = Field(
        True, description="accepted for WebUI clients: jobs never change global settings, nothing to restore"
    )
    priority: int = Field(0, ge=-100, le=100, description="orders your own queued jobs, higher first (fair share "
                                                       "orders owners); above your max_priority (0 unless an admin "
                                                       "raised it) is refused")
    webhook_url: str | None = Field(None, max_length=2000, description="http(s) URL told about this job's events")
    webhook_events: list[str] | None = Field(
        None, min_length=1, description="subset of queued, started, progress, succeeded, failed, canceled; "
                                        "default: terminal ones",
        json_schema_extra={"items": {"type": "string", "enum": list(WEBHOOK_EVENT_NAMES)}},
    )


class UpscaleRequest(BaseModel):
    """An upscale job (the WebUI's Extras tab): ``POST /v1/jobs`` with ``mode: "upscale"``.

    Field names and defaults are the WebUI API's (``ExtrasBaseRequest``); ``image`` or ``images`` (base64,
    data URL or ``upload:<id>``) are the inputs, each upscaled into one output image."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _no_nul = field_validator("*", mode="before")(refuse_nul)

    mode: Literal["upscale"]
    image: str | None = Field(None, description="one input image: base64, data URL or upload:<id>")
    images: list[str] | None = Field(None, min_length=1, description="several inputs, one output each")
    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize, 1: scale to upscaling_resize_w"
                                                      " x upscaling_resize_h")
    upscaling_resize: float = Field(2.0, gt=0.0, le=8.0, description="scale factor (resize_mode 0)")
    upscaling_resize_w: int = Field(512, ge=1, le=16384, description="target width (resize_mode 1)")
    upscaling_resize_h: int = Field(512, ge=1, le=16384, description="target height (resize_mode 1)")
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop to the target's aspect ratio")
    upscaler_1: str = Field("None", max_length=500, description="GET /v1/upscalers; None: no upscale")
    upscaler_2: str = Field("None", max_length=500, description="blended over upscaler_1's result")
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0, description="GFPGAN face restoration, blended over the "
                                                                      "upscaled image (models/GFPGAN/)")
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0, description="CodeFormer: not available (licence)")
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    priority: int = Field(0, ge=-100, le=100, description="orders your own queued jobs, higher first (fair share "
                                                       "orders owners); above your max_priority (0 unless an admin "
                                                       "raised it) is refused")
    webhook_url: str | None = Field(None, max_length=2000, description="http(s) URL told about this job's events")
    webhook_events: list[str] | None = Field(
        None, min_length=1, description="subset of queued, started, progress, succeeded, failed, canceled; "
                                        "default: terminal ones",
        json_schema_extra={"items": {"type": "string", "enum": list(WEBHOOK_EVENT_NAMES)}},
    )

    def inputs(self) -> list[tuple[str, tuple[str | int, ...]]]:
        """Each input image with the request field that holds it; raises FieldError unless exactly one of
        ``image`` and ``images`` is given."""
        if (self.image is None) == (self.images is None):
            raise FieldError(("body", "image"), "give exactly one of image (one input) or images (a list)")
        if self.image is not None:
            return [(self.image, ("body", "image"))]
        return [(value, ("body", "images", index)) for index, value in enumerate(self.images or [])]


def hires_target_size(width: int, height: int, hr_scale: float, hr_resize_x: int,
                      hr_resize_y: int) -> tuple[int, int, int, int]:
    """(upscale_w, upscale_h, final_w, final_h) of the hires fix, as the WebUI computes them.

    With hr_resize_x/y both 0 the image is scaled by hr_scale. With one of them 0 the other keeps
    the aspect ratio. With both, the image is upscaled to cover the target and cropped to it
    (``calculate_target_resolution`` in the WebUI's processing.py). Workers use the same function.
    """
    if hr_resize_x == 0 and hr_resize_y == 0:
        w, h = int(width * hr_scale), int(height * hr_scale)
        return w, h, w, h
    if hr_resize_y == 0:
        return hr_resize_x, hr_resize_x * height // width, hr_resize_x, hr_resize_x * height // width
    if hr_resize_x == 0:
        return hr_resize_y * width // height, hr_resize_y, hr_resize_y * width // height, hr_resize_y
    if width / height < hr_resize_x / hr_resize_y:
        return hr_resize_x, hr_resize_x * height // width, hr_resize_x, hr_resize_y
    return hr_resize_y * width // height, hr_resize_y, hr_resize_x, hr_resize_y


def _check_size(w: int, h: int, field: tuple[str, ...], what: str, settings: Settings) -> None:
    if max(w, h) > settings.limits.max_side:
        raise FieldError(field, f"{what} {w}x{h} must be at most {settings.limits.max_side} on each side")
    if w * h > settings.limits.max_pixels:
        raise FieldError(field, f"{what} {w}x{h} = {w * h} pixels exceeds the limit of {settings.limits.max_pixels}")


def check_limits(req: Txt2ImgRequest, settings: Settings) -> None:
    """Rules that depend on the farm's configuration; raises FieldError naming the field.

    Sizes need not be multiples of 8, as in the WebUI: the latent is ``height // 8`` x ``width // 8``, the image
    comes out at 8 times that, and the infotext's ``Size`` is the size asked for (``processing.py``)."""
    for name in ("width", "height"):
        value = getattr(req, name)
        if value > settings.limits.max_side:
            raise FieldError(("body", name), f"{name} must be at most {settings.limits.max_side}, got {value}")
    if req.width * req.height > settings.limits.max_pixels:
        raise FieldError(
            ("body", "width"),
            f"width x height = {req.width * req.height} pixels exceeds the limit of {settings.limits.max_pixels}",
        )
    if req.steps > settings.limits.max_steps:
        raise FieldError(("body", "steps"), f"steps must be between 1 and {settings.limits.max_steps}")
    if req.batch_size > settings.limits.max_batch_size:
        raise FieldError(("body", "batch_size"), f"batch_size must be between 1 and {settings.limits.max_batch_size}")
    if req.n_iter > settings.limits.max_n_iter:
        raise FieldError(("body", "n_iter"), f"n_iter must be between 1 and {settings.limits.max_n_iter}")
    if req.batch_size * req.n_iter > settings.limits.max_images_per_job:
        raise FieldError(
            ("body", "n_iter"),
            f"batch_size x n_iter must be at most {settings.limits.max_images_per_job} images per job",
        )
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if getattr(req, name) > settings.limits.max_side:
            raise FieldError(("body", name), f"{name} must be at most {settings.limits.max_side}")
    if req.init_images is not None and len(req.init_images) > settings.limits.max_batch_size:
        raise FieldError(("body", "init_images"), f"at most {settings.limits.max_batch_size} init images per job")
    if req.enable_hr:
        _check_hires(req, settings)


def _check_hires(req: Txt2ImgRequest, settings: Settings) -> None:
    if req.hr_second_pass_steps > settings.limits.max_steps:
        raise FieldError(("body", "hr_second_pass_steps"),
                         f"hr_second_pass_steps must be between 0 and {settings.limits.max_steps}")
    up_w, up_h, final_w, final_h = hires_target_size(req.width, req.height, req.hr_scale, req.hr_resize_x,
                                                     req.hr_resize_y)
    field = ("body", "hr_scale") if req.hr_resize_x == 0 and req.hr_resize_y == 0 else ("body", "hr_resize_x")
    _check_size(final_w, final_h, field, "the hires fix target size", settings)
    _check_size(up_w, up_h, field, "the hires fix upscale size", settings)


def check_mode(req: Txt2ImgRequest) -> Literal["txt2img", "img2img"]:
    """txt2img or img2img, from ``mode`` and ``init_images``; contradictions name the field at fault."""
    has_init = bool(req.init_images)
    if req.mode == "img2img" and not has_init:
        raise FieldError(("body", "init_images"), "img2img needs at least one init image")
    if has_init and "mode" in req.model_fields_set and req.mode == "txt2img":
        raise FieldError(("body", "init_images"), "init_images are for img2img; leave mode out or set it to img2img")
    mode: Literal["txt2img", "img2img"] = "img2img" if has_init else "txt2img"
    if mode == "txt2img" and req.mask is not None:
        raise FieldError(("body", "mask"), "a mask needs init_images (inpainting is img2img)")
    if mode == "img2img" and req.enable_hr:
        raise FieldError(("body", "enable_hr"), "hires fix is a txt2img option; img2img has none")
    return mode


def _sampler(name: str, schedule: str | None, sampler_field: str, schedule_field: str) -> SamplerChoice:
    """resolve_sampler, with its errors moved onto the hires fields when those are the ones checked."""
    try:
        return resolve_sampler(name, schedule)
    except FieldError as exc:
        field = sampler_field if exc.field[-1] == "sampler_name" else schedule_field
        raise FieldError(("body", field), exc.message) from exc


def _hires_sampler(req: Txt2ImgRequest, first_pass: SamplerChoice) -> tuple[str | None, str | None]:
    """(hr_sampler_name, hr_scheduler): canonical names, None where the hires pass uses the first pass's.

    A legacy name such as "DPM++ 2M Karras" with no hr_scheduler splits like the main sampler does;
    a plain name inherits the first pass's schedule type, which it must support.
    """
    if req.hr_sampler_name is None and req.hr_scheduler is None:
        return None, None
    name = req.hr_sampler_name or first_pass.sampler_name
    chosen = _sampler(name, req.hr_scheduler, "hr_sampler_name", "hr_scheduler")
    hr_name = chosen.sampler_name if req.hr_sampler_name is not None else None
    if req.hr_scheduler is not None or chosen.schedule_type != "Automatic":
        return hr_name, chosen.schedule_type
    try:
        resolve_sampler(chosen.sampler_name, first_pass.schedule_type)
    except FieldError as exc:
        raise FieldError(("body", "hr_sampler_name"),
                         f"{exc.message} (the first pass's schedule type); set hr_scheduler") from exc
    return hr_name, None


def _random_if_unset(seed: int) -> int:
    return seed if seed != -1 else secrets.randbelow(MAX_SEED)


def resolve_params(
    req: Txt2ImgRequest,
    model_name: str,
    *,
    style_book: StyleBook | None = None,
    init_images: list[str] | None = None,
    mask: str | None = None,
) -> dict[str, Any]:
    """The immutable parameter object a worker renders from: every default and the seeds made explicit.

    ``req`` must already carry resolved names (model, VAE and upscaler file names; see
    :func:`api.submission.params.plan_job`); ``init_images`` and ``mask`` are object-store keys.
    Styles are applied here, so ``prompt`` is what the worker encodes and what the infotext shows.
    """
    mode = check_mode(req)
    sampler = _sampler(req.sampler_name, req.scheduler, "sampler_name", "scheduler")
    hr_sampler_name, hr_scheduler = _hires_sampler(req, sampler)
    if style_book is None and req.styles:
        style_book = StyleBook(read_styles_csv(BUILTIN_STYLES_FILE))
    prompt, negative_prompt = req.prompt, req.negative_prompt
    hr_prompt, hr_negative_prompt = req.hr_prompt, req.hr_negative_prompt
    if req.styles and style_book is not None:
        prompt, negative_prompt = style_book.apply(prompt, negative_prompt, req.styles)
        # Like the WebUI: an empty hires prompt means "the prompt", which already carries the styles.
        styled_hr = style_book.apply(hr_prompt, hr_negative_prompt, req.styles)
        hr_prompt = styled_hr[0] if hr_prompt else ""
        hr_negative_prompt = styled_hr[1] if hr_negative_prompt else ""
    denoising = req.denoising_strength
    if denoising is None:
        denoising = IMG2IMG_DENOISING if mode == "img2img" else HIRES_DENOISING
    vae = req.vae if req.vae is not None and req.vae.strip().lower() not in ("", "none", "automatic") else None
    return {
        "mode": mode,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "styles": list(req.styles),
        "steps": req.steps,
        "cfg_scale": req.cfg_scale,
        "sampler_name": sampler.sampler_name,
        "scheduler": sampler.schedule_type,
        "seed": _random_if_unset(req.seed),
        "subseed": _random_if_unset(req.subseed),
        "subseed_strength": req.subseed_strength,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "width": req.width,
        "height": req.height,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "model": model_name,
        "vae": vae,
        "clip_skip": req.clip_skip,
        "eta_noise_seed_delta": req.eta_noise_seed_delta,
        "batch_invariant": req.batch_invariant,
        "denoising_strength": denoising,
        "init_images": list(init_images or []),
        "mask": mask,
        "mask_blur": req.mask_blur,
        "inpainting_fill": req.inpainting_fill,
        "inpaint_full_res": req.inpaint_full_res,
        "inpaint_full_res_padding": req.inpaint_full_res_padding,
        "inpainting_mask_invert": req.inpainting_mask_invert,
        "resize_mode": req.resize_mode,
        "enable_hr": req.enable_hr,
        "hr_scale": req.hr_scale,
        "hr_resize_x": req.hr_resize_x,
        "hr_resize_y": req.hr_resize_y,
        "hr_upscaler": req.hr_upscaler,
        "hr_second_pass_steps": req.hr_second_pass_steps,
        "hr_prompt": hr_prompt,
        "hr_negative_prompt": hr_negative_prompt,
        "hr_sampler_name": hr_sampler_name,
        "hr_scheduler": hr_scheduler,
        "output_format": req.output_format,
        "restore_faces": req.restore_faces,
        # Resolved by api.submission.prompt_builder (no "random" left), so the build repeats.
        "prompt_builder": req.prompt_builder.model_dump(mode="json") if req.prompt_builder is not None else None,
        # Filled from the models folder by api.submission.params.plan_job (LoRA files and hashes, VAE hash).
        "loras": [],
        "vae_hash": None,
        "controlnet": [],  # the API resolves the units (api.submission.controlnet)
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


class TrainingStatus(BaseModel):
    """A training job's own progress in its job view (and so in its SSE events and webhooks); the whole of it,
    with previews and the loss curve, is `GET /v1/trainings/{id}`."""

    step: int
    steps: int
    loss: float | None
    learn_rate: float | None
    eta_seconds: float | None
    checkpoint_step: int | None
    result: dict[str, Any] | None


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
    phase: str | None = Field(None, description="while running, before the render: 'downloading' when the worker "
                                                "pulls model files from the model store")
    current_step: int
    total_steps: int
    eta_seconds: float | None = Field(description="estimated seconds until done: while running from its progress, "
                                                  "while queued from its queue position and the fleet's recent pace "
                                                  "(null with no live worker)")
    queue_position: int | None = Field(description="1 = next to run, while queued")
    batch_id: uuid.UUID | None = Field(None, description="the batch it was claimed in, shared by the jobs that "
                                                         "rode together")
    batch_images: int | None = Field(None, description="images per UNet call that rendered it (its effective "
                                                       "batch size), once succeeded")
    render_seconds: float | None = Field(None, description="its share of its batch's render time, once succeeded")
    images: list[ImageView]
    error: ErrorView | None
    links: dict[str, str]
    training: TrainingStatus | None = Field(None, description="a training's step, loss, ETA, last checkpoint and "
                                                              "result (trainings only)")


class JobListView(BaseModel):
    jobs: list[JobView]
    total: int
    limit: int
    offset: int
