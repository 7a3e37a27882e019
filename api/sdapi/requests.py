"""The WebUI's txt2img/img2img request bodies, and how each becomes an ordinary farm job request.

Field names and defaults follow the WebUI's ``StableDiffusionTxt2ImgProcessingAPI`` and
``...Img2ImgProcessingAPI`` (``modules/api/models.py``). Unknown fields are ignored, as the WebUI
ignores them, but a *feature* we do not have is never silently dropped: an enabled
``alwayson_scripts`` entry, a ``script_name``, tiling or a hires checkpoint is a
422 naming it, and sampler knobs we cannot honour (eta, s_churn, ...) are reported as warnings in
``info``. Only fields the client actually sent become farm fields, so the farm's rules for
``infotext`` and ``override_settings`` (fill only what was not sent) work exactly as in the WebUI.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.sdapi.controlnet_args import ControlNetArgs, controlnet_args, is_controlnet_script
from api.submission.params import OVERRIDE_SETTINGS, request_fields_from_infotext
from shared.errors import FieldError
from shared.jobs.schemas import MAX_SEED, Txt2ImgRequest, refuse_nul
from shared.webui.infotext import parse_infotext

__all__ = ["Img2ImgBody", "Txt2ImgBody", "WebuiBody", "to_farm_request", "unsupported_features"]


class WebuiBody(BaseModel):
    """Fields common to both routes, with the WebUI's defaults."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    _no_nul = field_validator("*", mode="before")(refuse_nul)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64)
    height: int = Field(512, ge=64)
    # Features the farm does not have: the schema lists the values that mean "off", the only ones accepted.
    restore_faces: bool | None = Field(None, description="GFPGAN (the farm's only face restorer)")
    tiling: bool | None = Field(None, json_schema_extra={"enum": [False, None]})
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(None, json_schema_extra={"enum": [None, "", "None"]})
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    infotext: str | None = None
    script_name: str | None = Field(None, json_schema_extra={"enum": [None, ""]})
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None


class Txt2ImgBody(WebuiBody):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = Field(2.0, ge=1.0, le=8.0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_checkpoint_name: str | None = Field(None, json_schema_extra={"enum": [None, "", "Use same checkpoint"]})
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(WebuiBody):
    init_images: list[str] = Field(min_length=1, description="base64 images (data: prefix allowed) or upload:<id>")
    resize_mode: int = Field(0, ge=0, le=3)
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


# Fields copied to the farm request under the same name, when the client sent them.
_SAME_NAME = (
    "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "batch_size", "n_iter", "steps",
    "cfg_scale", "width", "height", "denoising_strength", "override_settings", "infotext",
    "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_sampler_name",
    "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "init_images", "resize_mode", "mask", "mask_blur", "inpainting_fill", "inpaint_full_res",
    "inpaint_full_res_padding", "inpainting_mask_invert", "restore_faces",
)
# Sampler knobs the farm cannot honour, and the values that mean "not used" (the WebUI's and webuiapi's).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "eta": (None, 1.0, 0.0), "s_churn": (None, 0.0), "s_tmax": (None, 0.0), "s_tmin": (None, 0.0),
    "s_noise": (None, 1.0), "s_min_uncond": (None, 0.0), "initial_noise_multiplier": (None, 1.0),
    "image_cfg_scale": (None, 1.5), "refiner_switch_at": (None, 0.0, 1.0), "latent_mask": (None,),
}
_SCRIPT_OFF = (False, None, "", 0)
# WebUI API defaults that differ from the farm's own, applied last (lowest precedence).
_WEBUI_DEFAULTS: dict[str, Any] = {"steps": 50}
_WEBUI_INPAINT_DEFAULTS: dict[str, Any] = {
    "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
}


def _script_enabled(entry: Any) -> bool:
    """An alwayson script entry does something unless it is empty or its first argument is off.

    Clients (webuiapi, plug-ins) send ``{"args": []}`` or ``{"args": [False]}`` to keep an
    extension disabled; those are harmless here. Anything else asks for a feature.
    """
    args = entry.get("args") if isinstance(entry, dict) else entry
    if not args:
        return False
    first = args[0] if isinstance(args, list) else args
    return not (first in _SCRIPT_OFF or (isinstance(first, dict) and first.get("enabled") is False))


def unsupported_features(body: WebuiBody) -> list[str]:
    """Warnings for knobs sent with a value we cannot honour; raises FieldError for missing features."""
    if body.script_name:
        raise FieldError(("body", "script_name"), f"script {body.script_name!r} is not available on this farm; "
                                                  "GET /sdapi/v1/scripts lists none")
    enabled = [name for name, entry in body.alwayson_scripts.items()
               if _script_enabled(entry) and not is_controlnet_script(name)]
    if enabled:
        raise FieldError(("body", "alwayson_scripts", enabled[0]),
                         f"alwayson_scripts {', '.join(map(repr, enabled))} not available on this farm; "
                         "remove them (or send them disabled)")
    if body.tiling:
        raise FieldError(("body", "tiling"), "tiling is not available on this farm")
    if body.refiner_checkpoint not in (None, "", "None"):
        raise FieldError(("body", "refiner_checkpoint"), "a refiner checkpoint is not available on this farm")
    hr_checkpoint = getattr(body, "hr_checkpoint_name", None)
    if hr_checkpoint not in (None, "", "Use same checkpoint"):
        raise FieldError(("body", "hr_checkpoint_name"), "a separate hires checkpoint is not available on this farm")
    warnings = [f"alwayson_scripts {name!r} was sent disabled and is not installed here"
                for name in body.alwayson_scripts if not is_controlnet_script(name)]
    warnings += controlnet_args(body.alwayson_scripts).warnings
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name, None)
        if value not in neutral:
            warnings.append(f"{name}={value!r} is not supported by the farm's samplers and was not applied")
    if body.disable_extra_networks:
        warnings.append("disable_extra_networks is not supported; <lora:...> tags in the prompt are not applied "
                        "by the farm yet anyway")
    return warnings


def _mapped_fields(body: WebuiBody) -> dict[str, Any]:
    sent = body.model_fields_set
    fields = {name: getattr(body, name) for name in _SAME_NAME if name in sent and hasattr(body, name)}
    if "sampler_name" in sent or "sampler_index" in sent:  # the WebUI: sampler_name or else sampler_index
        fields["sampler_name"] = body.sampler_name or body.sampler_index
    if "scheduler" in sent and body.scheduler:
        fields["scheduler"] = body.scheduler
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if name in sent:  # the WebUI treats any value <= 0 as "no resize"
            fields[name] = max(getattr(body, name), 0) or -1
    for name in ("styles", "hr_upscaler", "hr_sampler_name", "hr_scheduler", "denoising_strength", "restore_faces"):
        if fields.get(name) is None:
            fields.pop(name, None)
    if isinstance(body, Img2ImgBody):
        if "mask_blur" not in sent and ("mask_blur_x" in sent or "mask_blur_y" in sent):
            fields["mask_blur"] = max(body.mask_blur_x, body.mask_blur_y)
        if body.mask is None:
            for name in ("mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                         "inpainting_mask_invert"):
                fields.pop(name, None)  # inpainting options mean nothing without a mask
        fields["mode"] = "img2img"
    elif not getattr(body, "enable_hr", False):
        # txt2img without hires fix has no denoising step (webuiapi always sends 0.7)
        fields.pop("denoising_strength", None)
    return fields


def _given_by_infotext(fields: dict[str, Any]) -> set[str]:
    if not fields.get("infotext"):
        return set()
    parsed = parse_infotext(str(fields["infotext"]))
    found = set(request_fields_from_infotext(parsed, str(fields.get("mode", "txt2img"))))
    if "Model" in parsed or "Model hash" in parsed:
        found.add("model")
    return found


def to_farm_request(body: WebuiBody, defaults: dict[str, Any]) -> Txt2ImgRequest:
    """The farm request for a WebUI body; ``defaults`` (the key's options) fill only what nothing else set.

    Precedence, highest first: a field the client sent, its ``override_settings``, its ``infotext``,
    the key's options, the farm's defaults. Raises FieldError with the WebUI field's location.
    """
    fields = _mapped_fields(body)
    units = controlnet_args(body.alwayson_scripts)
    if units.units:
        fields["controlnet"] = units.units
    overridden = {OVERRIDE_SETTINGS[k] for k in (body.override_settings or {}) if k in OVERRIDE_SETTINGS}
    taken = set(fields) | overridden | _given_by_infotext(fields)
    fallback = {**_WEBUI_DEFAULTS, **(_WEBUI_INPAINT_DEFAULTS if fields.get("mask") else {}), **defaults}
    for field, value in fallback.items():
        if field not in taken and value is not None:
            fields[field] = value
    try:
        return Txt2ImgRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        got = repr(error.get("input"))
        raise units.relocate(FieldError(("body", *error["loc"]), f"{error['msg']} (got {got[:80]})")) from exc


def controlnet_of(body: WebuiBody) -> ControlNetArgs:
    """The body's ControlNet units (to relocate errors about them onto ``alwayson_scripts``)."""
    return controlnet_args(body.alwayson_scripts)
