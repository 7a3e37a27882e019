"""ControlNet: the farm's lists (``/v1/controlnet/...``) and the extension's own API routes (``/controlnet/...``).

The extension's routes answer in its shapes (``scripts/api.py``, API version 3) so its clients work unchanged;
they take the WebUI API's auth. Lists show what jobs may use on this farm: loadable models (a refused file is
on ``/v1/controlnet/models`` with its reason) and the preprocessors that run here. ``/controlnet/detect`` runs a
weight-free preprocessor in the gateway's thread pool (numpy/OpenCV; no torch, no model), the same code the
workers run before the denoising loop.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentKey, SettingsDep
from api.sdapi.auth import SdapiKey
from api.submission.controlnet import available_modules, why_not
from api.submission.images import decode_base64_image, decode_image
from shared.controlnet.detectmap import rgb_array
from shared.controlnet.models import list_controlnets
from shared.controlnet.preprocessors import PREPROCESSORS, Slider, module_list, resolve_module
from shared.controlnet.preprocessors import run_preprocessor as run_module
from shared.errors import FieldError
from shared.webui.image_metadata import encode_png

router = APIRouter(tags=["controlnet"])
# The most units a job may have (``controlnet`` on a job); the extension's setting of that name.
MAX_UNITS = 8
API_VERSION = 3


class ControlNetModelView(BaseModel):
    name: str
    title: str
    location: str
    size: int
    hash: str | None
    architecture: str | None
    family: str | None
    layout: str | None
    loadable: bool
    refused_reason: str | None


class SliderView(BaseModel):
    name: str
    value: float
    min: float
    max: float
    step: float


class ModuleView(BaseModel):
    name: str
    label: str
    available: bool
    reason: str | None
    needs_weights: bool
    weight_files: list[str]
    model_free: bool
    sliders: dict[str, SliderView | None]


@router.get("/v1/controlnet/models", response_model=list[ControlNetModelView])
def controlnet_models(key: CurrentKey, settings: SettingsDep) -> list[ControlNetModelView]:
    """Every ControlNet in ``models/ControlNet`` (and the extension's folder), with the title clients send."""
    return [ControlNetModelView(name=e.name, title=e.title, location=e.location, size=e.size, hash=e.hash,
                                architecture=e.architecture, family=e.family, layout=e.layout, loadable=e.loadable,
                                refused_reason=e.refused_reason)
            for e in list_controlnets(settings.models.models_dir)]


def _slider(slider: Slider | None) -> SliderView | None:
    if slider is None or not slider.visible:
        return None
    return SliderView(name=slider.label, value=slider.default, min=slider.minimum, max=slider.maximum, step=slider.step)


@router.get("/v1/controlnet/modules", response_model=list[ModuleView])
def controlnet_modules(key: CurrentKey, settings: SettingsDep) -> list[ModuleView]:
    """Every preprocessor the extension knows, in its order, saying which run here and their sliders' defaults."""
    views = []
    for name in module_list():
        module = PREPROCESSORS[name]
        res, a, b = module.sliders()
        reason = why_not(module, settings.models.models_dir)
        views.append(ModuleView(
            name=module.name, label=module.label, available=reason is None, reason=reason,
            needs_weights=module.needs_weights, weight_files=list(module.weight_files),
            model_free=not module.needs_controlnet_model,
            sliders={"processor_res": _slider(res), "threshold_a": _slider(a), "threshold_b": _slider(b)},
        ))
    return views


# -- the extension's routes ------------------------------------------------------------------------------------


@router.get("/controlnet/version")
def version(key: SdapiKey) -> dict[str, int]:
    return {"version": API_VERSION}


@router.get("/controlnet/settings")
def extension_settings(key: SdapiKey) -> dict[str, int]:
    return {"control_net_unit_count": MAX_UNITS}


@router.get("/controlnet/model_list")
def model_list(key: SdapiKey, settings: SettingsDep, update: bool = True) -> dict[str, list[str]]:
    """Titles of the loadable models (the extension's ``update`` rescans; every call here reads the folder)."""
    return {"model_list": [e.title for e in list_controlnets(settings.models.models_dir) if e.loadable]}


@router.get("/controlnet/module_list")
def extension_module_list(key: SdapiKey, settings: SettingsDep, alias_names: bool = Query(False)) -> dict[str, Any]:
    """The preprocessors that run on this farm, by internal name (or UI label), with their visible sliders."""
    names = available_modules(settings.models.models_dir)
    detail: dict[str, Any] = {}
    listed = []
    for name in names:
        module = PREPROCESSORS[name]
        shown = module.label if alias_names else module.name
        listed.append(shown)
        sliders = [view.model_dump() for view in map(_slider, module.sliders()) if view is not None]
        detail[shown] = {"model_free": not module.needs_controlnet_model, "sliders": sliders}
    return {"module_list": listed, "module_detail": detail}


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    controlnet_module: str = Field("none", max_length=200)
    controlnet_input_images: list[str] = Field(default_factory=list, min_length=1, max_length=8)
    controlnet_processor_res: int = Field(-1, ge=-1, le=4096)
    controlnet_threshold_a: float = Field(-1, ge=-1, le=4096)
    controlnet_threshold_b: float = Field(-1, ge=-1, le=4096)
    controlnet_masks: list[str] = Field(default_factory=list, max_length=8)
    low_vram: bool = False

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data: Any) -> Any:
        """``controlnet_images``: the name webuiapi's ``controlnet_detect`` (and the extension's old API) sends."""
        if isinstance(data, dict) and "controlnet_images" in data and "controlnet_input_images" not in data:
            data = {**data, "controlnet_input_images": data["controlnet_images"]}
        return data


def _detect(body: DetectRequest, models_dir: Path, max_bytes: int, max_pixels: int) -> dict[str, Any]:
    loc = ("body", "controlnet_module")
    try:
        module = resolve_module(body.controlnet_module)
    except KeyError:
        raise FieldError(loc, f"Module not available: {body.controlnet_module!r}; available: "
                              f"{', '.join(available_modules(models_dir))}") from None
    reason = why_not(module, models_dir) or (
        "runs on the workers only (it needs torch); use it in a job's unit" if module.needs_weights else None)
    if reason is not None:
        weight_free = [name for name in available_modules(models_dir) if not PREPROCESSORS[name].needs_weights]
        raise FieldError(loc, f"Module not supported here: {body.controlnet_module!r} {reason}; detect runs: "
                              f"{', '.join(weight_free)}")
    images = []
    for index, text in enumerate(body.controlnet_input_images):
        field = ("body", "controlnet_input_images", index)
        image = decode_image(decode_base64_image(text, field, max_bytes), field, max_pixels)
        detected = run_module(module.name, rgb_array(image), body.controlnet_processor_res, body.controlnet_threshold_a,
                              body.controlnet_threshold_b)
        images.append(base64.b64encode(encode_png(Image.fromarray(detected))).decode("ascii"))
    return {"images": images, "info": "Success"}


@router.post("/controlnet/detect")
async def detect(body: DetectRequest, key: SdapiKey, settings: SettingsDep) -> dict[str, Any]:
    """Run a preprocessor on the given images and return the detected maps (base64 PNG), as the extension does."""
    return await run_in_threadpool(_detect, body, settings.models.models_dir, settings.limits.max_upload_bytes,
                                   settings.limits.max_input_pixels)


__all__ = ["MAX_UNITS", "router"]
