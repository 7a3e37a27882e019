"""Hires fix: the first pass's size, the upscale between passes, and the second pass's step plan.

Mirrors ``StableDiffusionProcessingTxt2Img`` (``calculate_target_resolution``, ``sample_hr_pass``): the
first pass renders at width x height; the result is upscaled either in latent space
(``torch.nn.functional.interpolate`` with the WebUI's latent modes) or as a decoded image (Lanczos,
Nearest, None) and encoded again; the second pass is an img2img of ``hr_second_pass_steps`` steps at
the denoising strength, with its own prompt, sampler and fresh noise from the same seeds.

A model upscaler (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ...: ``hr_upscaler_file``) upscales the decoded image
as ``images.resize_image(0, ...)`` does with it (:func:`worker.engine.upscalers.upscale_to`), tiled as the
job's contract says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import FieldError
from shared.jobs.contract import RenderSpec

# shared.latent_upscale_modes in the WebUI.
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
OPT_F = 8


@dataclass(frozen=True)
class HiresPlan:
    """Sizes and settings of the second pass, resolved from a job's parameters."""

    target_width: int
    target_height: int
    truncate_x: int
    truncate_y: int
    upscaler: str
    upscaler_file: str | None  # a model upscaler's file, relative to the models folder
    tile: tuple[int, int]  # (tile size, overlap) of a model upscaler's passes
    latent_mode: tuple[str, bool] | None  # (interpolate mode, antialias) for latent upscalers
    steps: int  # hr_second_pass_steps or steps
    denoising_strength: float
    prompt: str
    negative_prompt: str
    sampler_name: str
    scheduler: str


def hires_plan(spec: RenderSpec) -> HiresPlan:
    """Resolve the second pass; raises FieldError for an upscaler this worker cannot run."""
    width, height = spec.width, spec.height
    upscaler = spec.hr_upscaler
    latent_mode = LATENT_UPSCALE_MODES.get(upscaler)
    if latent_mode is None and upscaler not in IMAGE_UPSCALERS and spec.hr_upscaler_file is None:
        raise FieldError(
            ("body", "hr_upscaler"),
            f"hr_upscaler {upscaler!r} names no installed upscaler; use one of GET /v1/upscalers: "
            f"{', '.join([*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS])} or a model file",
        )
    resize_x, resize_y = spec.hr_resize_x, spec.hr_resize_y
    truncate_x = truncate_y = 0
    if resize_x == 0 and resize_y == 0:
        to_x, to_y = int(width * spec.hr_scale), int(height * spec.hr_scale)
    elif resize_y == 0:
        to_x, to_y = resize_x, resize_x * height // width
    elif resize_x == 0:
        to_x, to_y = resize_y * width // height, resize_y
    else:
        if width / height < resize_x / resize_y:
            to_x, to_y = resize_x, resize_x * height // width
        else:
            to_x, to_y = resize_y * width // height, resize_y
        truncate_x, truncate_y = (to_x - resize_x) // OPT_F, (to_y - resize_y) // OPT_F
    return HiresPlan(
        target_width=to_x,
        target_height=to_y,
        truncate_x=truncate_x,
        truncate_y=truncate_y,
        upscaler=upscaler,
        upscaler_file=spec.hr_upscaler_file if latent_mode is None else None,
        tile=(spec.upscaler_tile, spec.upscaler_tile_overlap),
        latent_mode=latent_mode,
        steps=spec.hr_second_pass_steps or spec.steps,
        denoising_strength=spec.denoising_strength,
        prompt=spec.hr_prompt or spec.prompt,
        negative_prompt=spec.hr_negative_prompt or spec.negative_prompt,
        sampler_name=spec.hires_sampler[0],
        scheduler=spec.hires_sampler[1],
    )


def upscale_latent(latent: torch.Tensor, plan: HiresPlan) -> torch.Tensor:
    """A latent upscaler: interpolate ``(1, C, h, w)`` to the target's latent size."""
    assert plan.latent_mode is not None
    mode, antialias = plan.latent_mode
    size = (plan.target_height // OPT_F, plan.target_width // OPT_F)
    return torch.nn.functional.interpolate(latent, size=size, mode=mode, antialias=antialias)


def truncate_latent(latent: torch.Tensor, plan: HiresPlan) -> torch.Tensor:
    """Crop the centre when hr_resize_x/y asked for another aspect ratio than the first pass."""
    ty, tx = plan.truncate_y, plan.truncate_x
    return latent[:, :, ty // 2 : latent.shape[2] - (ty + 1) // 2, tx // 2 : latent.shape[3] - (tx + 1) // 2]


def hires_infotext_fields(spec: RenderSpec) -> dict[str, object]:
    """The hires keys the WebUI adds to ``extra_generation_params`` (txt2img ``init``)."""
    if not spec.enable_hr:
        return {}
    fields: dict[str, object] = {}
    if spec.hr_sampler_name and spec.hr_sampler_name != spec.sampler_name:
        fields["Hires sampler"] = spec.hr_sampler_name
    if spec.hr_scheduler and spec.hr_scheduler != spec.scheduler:
        fields["Hires schedule type"] = spec.hr_scheduler
    if spec.hr_prompt and spec.hr_prompt != spec.prompt:
        fields["Hires prompt"] = spec.hr_prompt
    if spec.hr_negative_prompt and spec.hr_negative_prompt != spec.negative_prompt:
        fields["Hires negative prompt"] = spec.hr_negative_prompt
    if spec.hr_resize_x == 0 and spec.hr_resize_y == 0:
        fields["Hires upscale"] = spec.hr_scale
    else:
        fields["Hires resize"] = f"{spec.hr_resize_x}x{spec.hr_resize_y}"
    if spec.hr_second_pass_steps:
        fields["Hires steps"] = spec.hr_second_pass_steps
    fields["Hires upscaler"] = spec.hr_upscaler
    return fields
