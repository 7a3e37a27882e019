"""From what a user sent to what a worker renders: infotext, override_settings, names, styles.

WebUI users send more than plain fields: an ``infotext`` pasted from an image, whose values fill
every field the request does not set (the WebUI API's ``apply_infotext``), and
``override_settings`` for the checkpoint, VAE, clip skip and ENSD. Both are folded into ordinary
request fields first, so everything after (limits, names, styles, seeds) checks one shape.

Precedence, as in the WebUI: a field set in the request > the same value in ``override_settings``
(a different value for both is a 422: the request would be ambiguous) > the infotext > defaults.
An error in a value that came from the infotext or from ``override_settings`` names that field,
not the one the user never sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.model_catalog import resolve_hypernetworks, resolve_job_loras, upscaler_checks, vae_hash
from api.submission.controlnet import ResolvedUnit, resolve_units
from api.submission.prompt_builder import apply_prompt_builder
from shared.controlnet.infotext import units_from_infotext
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.jobs.schemas import Txt2ImgRequest, check_limits, check_mode, resolve_params
from shared.models.face_restoration import check_face_restoration
from shared.models.files import find_infotext_checkpoint, resolve_vae
from shared.models.registry import CheckpointFile, default_checkpoint, resolve_checkpoint, scan_checkpoints
from shared.models.upscalers import LATENT_UPSCALERS, resolve_upscaler
from shared.settings import Settings
from shared.webui.hashes import HashCache
from shared.webui.infotext import parse_infotext
from shared.webui.styles import StyleBook, load_style_book

__all__ = ["OVERRIDE_SETTINGS", "JobPlan", "request_fields_from_infotext", "merge_request", "plan_job"]

Field = tuple[str | int, ...]
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]\s*$")
# The WebUI setting each accepted override_settings key stands for, as a request field.
OVERRIDE_SETTINGS: dict[str, str] = {
    "sd_model_checkpoint": "model",
    "sd_vae": "vae",
    "CLIP_stop_at_last_layers": "clip_skip",
    "eta_noise_seed_delta": "eta_noise_seed_delta",
    # Not a WebUI setting: the farm's batch_invariant job field, for clients that only speak the WebUI API.
    "renderfarm_batch_invariant": "batch_invariant",
}

# Infotext key -> request field, as the WebUI's paste fields map them (modules/ui.py, scripts' infotext_fields).
_COMMON_KEYS: tuple[tuple[str, str], ...] = (
    ("Prompt", "prompt"),
    ("Negative prompt", "negative_prompt"),
    ("Steps", "steps"),
    ("Sampler", "sampler_name"),
    ("Schedule type", "scheduler"),
    ("CFG scale", "cfg_scale"),
    ("Seed", "seed"),
    ("Size-1", "width"),
    ("Size-2", "height"),
    ("Batch size", "batch_size"),
    ("Variation seed", "subseed"),
    ("Variation seed strength", "subseed_strength"),
    ("Seed resize from-1", "seed_resize_from_w"),
    ("Seed resize from-2", "seed_resize_from_h"),
    ("Denoising strength", "denoising_strength"),
    ("Clip skip", "clip_skip"),
    ("ENSD", "eta_noise_seed_delta"),
    ("VAE", "vae"),
)
_TXT2IMG_KEYS: tuple[tuple[str, str], ...] = (
    ("Hires upscale", "hr_scale"),
    ("Hires resize-1", "hr_resize_x"),
    ("Hires resize-2", "hr_resize_y"),
    ("Hires steps", "hr_second_pass_steps"),
    ("Hires upscaler", "hr_upscaler"),
    ("Hires prompt", "hr_prompt"),
    ("Hires negative prompt", "hr_negative_prompt"),
)
_IMG2IMG_KEYS: tuple[tuple[str, str], ...] = (
    ("Mask blur", "mask_blur"),
    ("Masked area padding", "inpaint_full_res_padding"),
)
_MASKED_CONTENT = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}


def _unless(sentinel: str) -> Callable[[object], object]:
    return lambda value: None if value == sentinel else value


# Infotext key -> (field, conversion) for values that are not the field's value as written.
_TXT2IMG_CONVERTED: dict[str, tuple[str, Callable[[object], object]]] = {
    "Hires sampler": ("hr_sampler_name", _unless("Use same sampler")),
    "Hires schedule type": ("hr_scheduler", _unless("Use same scheduler")),
}
_IMG2IMG_CONVERTED: dict[str, tuple[str, Callable[[object], object]]] = {
    "Masked content": ("inpainting_fill", lambda value: _MASKED_CONTENT.get(str(value).lower(), value)),
    "Inpaint area": ("inpaint_full_res", lambda value: value == "Only masked"),
    "Mask mode": ("inpainting_mask_invert", lambda value: 1 if value == "Inpaint not masked" else 0),
}


def _hires_enabled(parsed: Mapping[str, object]) -> bool:
    """What the WebUI's paste does for its "Hires fix" checkbox, minus a quirk.

    The WebUI checks for "Hires resize-1", which its own parser always adds (as 0), so any infotext
    with a denoising strength turns hires fix on, img2img ones included. Only real hires keys count here.
    """
    resize = str(parsed.get("Hires resize-1", 0)) not in ("0", "")
    return "Denoising strength" in parsed and ("Hires upscale" in parsed or "Hires upscaler" in parsed or resize)


def request_fields_from_infotext(parsed: Mapping[str, object], mode: str) -> dict[str, tuple[object, str]]:
    """Request field -> (value, infotext key) for every field an infotext gives, in the job's mode."""
    keys = _COMMON_KEYS + (_TXT2IMG_KEYS if mode == "txt2img" else _IMG2IMG_KEYS)
    found: dict[str, tuple[object, str]] = {field: (parsed[key], key) for key, field in keys if key in parsed}
    converted = _TXT2IMG_CONVERTED if mode == "txt2img" else _IMG2IMG_CONVERTED
    for key, (field, convert) in converted.items():
        if key in parsed:
            found[field] = (convert(parsed[key]), key)
    if mode == "txt2img" and _hires_enabled(parsed):
        found["enable_hr"] = (True, "Denoising strength")
    return found


@dataclass(frozen=True)
class _Origin:
    loc: Field
    label: str

    def hint(self, field: str) -> str:
        """How to get past a value the user did not type: set the field, which wins over the infotext."""
        return f"; set {field} in the request to override the infotext" if self.loc == ("body", "infotext") else ""


def _apply_overrides(req: Txt2ImgRequest, explicit: dict[str, Any], origins: dict[str, _Origin]) -> None:
    for key, value in (req.override_settings or {}).items():
        loc: Field = ("body", "override_settings", key)
        field = OVERRIDE_SETTINGS.get(key)
        if field is None:
            raise FieldError(loc, f"unsupported setting {key!r}; override_settings accepts: "
                                  f"{', '.join(OVERRIDE_SETTINGS)}")
        if field in explicit and str(explicit[field]) != str(value):
            raise FieldError(loc, f"{key}={value!r} conflicts with {field}={explicit[field]!r}; send only one")
        explicit[field] = value
        origins[field] = _Origin(loc, f"override_settings {key}")


def _infotext_model(parsed: Mapping[str, object], settings: Settings) -> str:
    model, model_hash = parsed.get("Model"), parsed.get("Model hash")
    found = find_infotext_checkpoint(settings.models.models_dir, str(model) if model else None,
                                     str(model_hash) if model_hash else None,
                                     HashCache.of_models_dir(settings.models.models_dir))
    if found is None:
        installed = ", ".join(c.name for c in scan_checkpoints(settings.models.models_dir) if c.loadable) or "none"
        raise FieldError(("body", "infotext"), f"the infotext's model {model!r} (hash {model_hash}) is not "
                                               f"installed; set model to one of: {installed}")
    return found


def _infotext_units(parsed: Mapping[str, object], sent: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The infotext's ControlNet units merged with the request's (``sent``, the fields each unit set): unit i's
    fields the request sets win (its image, which an infotext never holds, typically). None when the infotext
    records no unit."""
    try:
        recorded = units_from_infotext(parsed)
    except ValueError as exc:
        raise FieldError(("body", "infotext"), f"infotext's ControlNet unit: {exc}") from exc
    if not recorded:
        return None
    merged = [{**recorded_unit, **(sent[i] if i < len(sent) else {})} for i, recorded_unit in enumerate(recorded)]
    return merged + sent[len(recorded):]


def merge_request(req: Txt2ImgRequest, settings: Settings) -> tuple[Txt2ImgRequest, dict[str, _Origin]]:
    """The request with override_settings and infotext folded into fields, and where each such value came from."""
    explicit = req.model_dump(exclude_unset=True, exclude={"infotext", "override_settings"})
    origins: dict[str, _Origin] = {}
    _apply_overrides(req, explicit, origins)
    filled: dict[str, Any] = {}
    if req.infotext and req.infotext.strip():
        parsed = parse_infotext(req.infotext)
        mode = "img2img" if req.init_images or req.mode == "img2img" else "txt2img"
        for field, (value, key) in request_fields_from_infotext(parsed, mode).items():
            if field not in explicit:
                filled[field] = value
                origins[field] = _Origin(("body", "infotext"), f"infotext {key!r}")
        if "model" not in explicit and ("Model" in parsed or "Model hash" in parsed):
            filled["model"] = _infotext_model(parsed, settings)
            origins["model"] = _Origin(("body", "infotext"), "infotext 'Model'")
        sent = [unit.model_dump(exclude_unset=True) for unit in req.controlnet]
        units = _infotext_units(parsed, sent)
        if units is not None:
            explicit.pop("controlnet", None)
            filled["controlnet"] = units
            for index, unit in enumerate(units):  # a unit's field is the infotext's unless the request set it
                for name in unit:
                    if index >= len(sent) or name not in sent[index]:
                        origins[_unit_field(index, name)] = _Origin(("body", "infotext"),
                                                                    f"infotext's ControlNet {index} {name!r}")
    if not filled and not req.override_settings:
        return req, origins
    try:
        merged = Txt2ImgRequest.model_validate({**filled, **explicit})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        origin = origins.get(field, _Origin(("body", *error["loc"]), field))
        got = repr(error.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        raise FieldError(origin.loc, f"{origin.label}: {error['msg']} (got {got}){origin.hint(field)}") from exc
    return merged, origins


def _unit_field(index: object, name: object) -> str:
    return f"controlnet.{index}.{name}"


def _blame(exc: FieldError, origins: Mapping[str, _Origin]) -> FieldError:
    """Move an error onto the infotext or override_settings when that is where the value came from."""
    if len(exc.field) >= 4 and exc.field[:2] == ("body", "controlnet"):
        origin = origins.get(_unit_field(exc.field[2], exc.field[3]))
        if origin is not None:
            return FieldError(origin.loc, f"{origin.label}: {exc.message}; set controlnet[{exc.field[2]}]."
                                          f"{exc.field[3]} in the request to override the infotext", exc.status_code)
        return exc
    if len(exc.field) >= 2 and exc.field[0] == "body" and str(exc.field[1]) in origins:
        origin = origins[str(exc.field[1])]
        return FieldError(origin.loc, f"{origin.label}: {exc.message}{origin.hint(str(exc.field[1]))}",
                          exc.status_code)
    return exc


def _checkpoint(requested: str, settings: Settings) -> CheckpointFile:
    """By name, file name or title; then, like the WebUI's checkpoint aliases, by base name or by hash."""
    try:
        return resolve_checkpoint(settings.models.models_dir, requested)
    except FieldError:
        name = _TITLE_HASH.sub("", requested.strip())
        found = find_infotext_checkpoint(settings.models.models_dir, name, requested.strip(),
                                         HashCache.of_models_dir(settings.models.models_dir))
        if found is None:
            raise
        return resolve_checkpoint(settings.models.models_dir, found)


@dataclass(frozen=True)
class JobPlan:
    """A fully checked job, still without its input images' object-store keys."""

    request: Txt2ImgRequest
    checkpoint: CheckpointFile
    spec: RenderSpec
    units: tuple[ResolvedUnit, ...] = ()  # the enabled ControlNet units, whose images are still to be staged

    def with_inputs(self, init_images: list[str], mask: str | None,
                    controls: list[tuple[str | None, str | None]] | None = None) -> RenderSpec:
        """The spec to store (``spec.to_stored()``), with the object-store keys of the staged inputs (``controls``:
        each unit's image and mask keys)."""
        update: dict[str, Any] = {"init_images": tuple(init_images), "mask": mask}
        if controls:
            update["controlnet"] = tuple(unit.model_copy(update={"image": image, "mask": unit_mask})
                                         for unit, (image, unit_mask) in zip(self.spec.controlnet, controls,
                                                                             strict=True))
        return self.spec.model_copy(update=update)


def _render_spec(params: dict[str, Any]) -> RenderSpec:
    """The contract of resolved params; a value it refuses is named like any other request error."""
    try:
        return RenderSpec.model_validate(params)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise FieldError(("body", *error["loc"][:1]), f"{error['msg']} (got {error.get('input')!r})") from exc


def plan_job(req: Txt2ImgRequest, settings: Settings, style_book: StyleBook | None = None,
             skipped_loras: list[str] | None = None) -> JobPlan:
    """Every check that needs no image bytes; raises FieldError naming the field (or infotext) at fault."""
    merged, origins = merge_request(apply_prompt_builder(req, settings), settings)
    try:
        check_mode(merged)
        check_limits(merged, settings)
        requested = merged.model or default_checkpoint(settings.models.models_dir, settings.models.default_model)
        if requested is None:
            raise FieldError(("body", "model"),
                             "no checkpoint is installed; put a .safetensors file in Stable-diffusion/")
        checkpoint = _checkpoint(requested, settings)
        hr_upscaler, hr_upscaler_file = resolve_upscaler(
            settings.models.models_dir, merged.hr_upscaler, ("body", "hr_upscaler"), latent=True,
            checks=upscaler_checks() if merged.enable_hr and merged.hr_upscaler not in LATENT_UPSCALERS else None)
        resolved = merged.model_copy(update={
            "vae": resolve_vae(settings.models.models_dir, merged.vae), "hr_upscaler": hr_upscaler,
        })
        book = style_book if style_book is not None else load_style_book(settings)
        params = resolve_params(resolved, checkpoint.name, style_book=book)
        # After styles, so a style's <lora:> tags count too; the tags stay in the prompt text.
        cache = HashCache.of_models_dir(settings.models.models_dir)
        params["loras"] = resolve_job_loras(settings.models.models_dir, params["prompt"], params["hr_prompt"],
                                            [(lora.name, lora.weight) for lora in resolved.loras], cache,
                                            skipped_loras)
        params["hypernetworks"] = resolve_hypernetworks(settings.models.models_dir, params["prompt"])
        params["vae_hash"] = vae_hash(settings.models.models_dir, params["vae"], cache)
        units = resolve_units(resolved.controlnet, settings.models.models_dir, checkpoint.path,
                              params["mode"] == "img2img")
        params["controlnet"] = [unit.fields for unit in units]
        if params["restore_faces"]:
            check_face_restoration(settings.models.models_dir, ("body", "restore_faces"))
        if hr_upscaler_file is not None and params["enable_hr"]:
            params.update(hr_upscaler_file=hr_upscaler_file.location, upscaler_tile=settings.models.upscaler_tile,
                          upscaler_tile_overlap=settings.models.upscaler_tile_overlap)
        spec = _render_spec(params)
    except FieldError as exc:
        raise _blame(exc, origins) from exc
    return JobPlan(resolved, checkpoint, spec, tuple(units))
