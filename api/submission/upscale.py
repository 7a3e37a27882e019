"""Upscale jobs (the WebUI's Extras tab): check the request, stage its images, and build the contract.

Everything the WebUI's ``run_extras`` would refuse is refused here, before anything is stored: an unknown or
refused upscaler, face restoration without its files in ``models/GFPGAN/`` (or CodeFormer, which the farm lacks),
an input that is not an image or is too large (its header is checked before any pixel is decoded), and an output
larger than ``max_upscale_pixels``. Each input's
own generation parameters are read from it and kept in the contract, since the WebUI keeps them in the output.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from api.model_catalog import upscaler_checks
from api.submission.images import checked_png, decode_image, probe_image, read_generation_info
from api.submission.inputs import StagedInputs, read_image_value
from shared.errors import FieldError
from shared.jobs.contract import UpscaleSpec
from shared.jobs.schemas import UpscaleRequest
from shared.models.face_restoration import check_face_restoration
from shared.models.upscalers import resolve_upscaler
from shared.settings import Settings
from shared.storage.base import ObjectStore

__all__ = ["UpscalePlan", "extras_output_size", "plan_upscale", "stage_upscale_inputs"]


@dataclass(frozen=True)
class UpscalePlan:
    """A checked upscale request, its upscalers resolved; the images are staged separately."""

    request: UpscaleRequest
    spec: UpscaleSpec  # without images yet

    @property
    def model_name(self) -> str:
        """What the job row shows as its model: the first upscaler."""
        return self.spec.upscaler_1


def plan_upscale(body: UpscaleRequest, settings: Settings) -> UpscalePlan:
    """Every check that needs no image bytes; raises FieldError naming the field."""
    body.inputs()  # exactly one of image / images
    if body.images is not None and len(body.images) > settings.limits.max_images_per_job:
        raise FieldError(("body", "images"), f"at most {settings.limits.max_images_per_job} images per job")
    if body.codeformer_visibility > 0:
        raise FieldError(("body", "codeformer_visibility"),
                         "CodeFormer is not available on this farm: its only maintained loader "
                         "(spandrel_extra_arches) carries CodeFormer's non-commercial licence; use 0")
    models_dir = settings.models.models_dir
    if body.gfpgan_visibility > 0:
        check_face_restoration(models_dir, ("body", "gfpgan_visibility"))
    checks = upscaler_checks()
    first, first_file = resolve_upscaler(models_dir, body.upscaler_1, ("body", "upscaler_1"), checks=checks)
    second, second_file = resolve_upscaler(models_dir, body.upscaler_2, ("body", "upscaler_2"), checks=checks)
    spec = UpscaleSpec(
        images=(), resize_mode=body.resize_mode, upscaling_resize=body.upscaling_resize,
        upscaling_resize_w=body.upscaling_resize_w, upscaling_resize_h=body.upscaling_resize_h,
        upscaling_crop=body.upscaling_crop, upscaler_1=first,
        upscaler_1_file=first_file.location if first_file is not None else None,
        upscaler_2=second, upscaler_2_file=second_file.location if second_file is not None else None,
        extras_upscaler_2_visibility=body.extras_upscaler_2_visibility, gfpgan_visibility=body.gfpgan_visibility,
        upscaler_tile=settings.models.upscaler_tile, upscaler_tile_overlap=settings.models.upscaler_tile_overlap,
        output_format=body.output_format,
    )
    return UpscalePlan(body, spec)


def extras_output_size(spec: UpscaleSpec, width: int, height: int) -> tuple[int, int]:
    """The size ``run_extras`` gives an input of ``width`` x ``height``: ``Upscaler.upscale`` floors its target to
    a multiple of 8, and resize_mode 1 with crop pastes onto a canvas of exactly the asked size."""
    if spec.upscaler_1 == "None":
        return width, height
    if spec.resize_mode == 1:
        if spec.upscaling_crop:
            return spec.upscaling_resize_w, spec.upscaling_resize_h
        scale = max(spec.upscaling_resize_w / width, spec.upscaling_resize_h / height)
    else:
        scale = spec.upscaling_resize
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def _check_output(spec: UpscaleSpec, width: int, height: int, loc: tuple[str | int, ...], settings: Settings) -> None:
    out_w, out_h = extras_output_size(spec, width, height)
    if out_w < 1 or out_h < 1:
        raise FieldError(loc, f"the image ({width}x{height}) upscaled as asked would be {out_w}x{out_h} pixels; "
                              "ask for a larger scale or size")
    if out_w * out_h > settings.limits.max_upscale_pixels:
        raise FieldError(loc, f"the image ({width}x{height}) upscaled as asked would be {out_w}x{out_h} = "
                              f"{out_w * out_h} pixels, over the limit of {settings.limits.max_upscale_pixels}")


def stage_upscale_inputs(plan: UpscalePlan, *, owner: str, store: ObjectStore,
                         settings: Settings) -> tuple[UpscaleSpec, StagedInputs]:
    """Check and re-encode every input (RGBA stays RGBA, anything else becomes RGB, as the WebUI 1.10 does),
    read its generation parameters, and check the output's size; raises FieldError naming the input."""
    prefix = f"inputs/{uuid.uuid4()}"
    blobs: dict[str, bytes] = {}
    keys: list[str] = []
    infotexts: list[str | None] = []
    for index, (value, loc) in enumerate(plan.request.inputs()):
        data = read_image_value(value, loc, owner, store, settings)
        header = probe_image(data, loc, settings.limits.max_input_pixels)
        _check_output(plan.spec, header.width, header.height, loc, settings)  # before a pixel is decoded
        image = decode_image(data, loc, settings.limits.max_input_pixels)
        _check_output(plan.spec, image.width, image.height, loc, settings)  # upright (EXIF orientation applied)
        infotext, _ = read_generation_info(data, loc, settings.limits.max_input_pixels)
        converted = image.convert("RGBA" if image.mode == "RGBA" else "RGB")
        key = f"{prefix}/extras_{index}.png"
        blobs[key] = checked_png(converted).png
        keys.append(key)
        infotexts.append(infotext or None)
    spec = plan.spec.model_copy(update={"images": tuple(keys), "infotexts": tuple(infotexts)})
    return spec, StagedInputs(init_keys=keys, blobs=blobs)
