"""A job's ControlNet units, checked and resolved before anything is stored (docs/architecture.md, rule 8).

Each enabled unit becomes a :class:`shared.controlnet.units.ControlUnit` (its images are staged with the job's
other inputs, :mod:`api.submission.inputs`): the preprocessor must exist and run on this farm (weight-free ones;
ones that need annotator weights are refused with the list of those that run), the model must be installed,
loadable and made for the job's checkpoint family, and the sliders take the preprocessor's defaults for -1.

Where the extension is lenient this is strict, so that nothing sent is dropped unnoticed: a threshold outside a
visible slider's range is a 422 naming it (the extension swaps in the default). A value for a slider the
preprocessor does not have is ignored, as in the extension (our users' own infotexts carry 64 there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.controlnet.annotators import annotator_available
from shared.controlnet.models import ControlNetFile, list_controlnets, resolve_controlnet
from shared.controlnet.preprocessors import PREPROCESSORS, Preprocessor, Slider, module_list, resolve_module
from shared.controlnet.units import UnitRequest
from shared.errors import FieldError
from shared.models.architecture import checkpoint_architecture

__all__ = ["ResolvedUnit", "available_modules", "resolve_units", "runs_here", "why_not"]

Field = tuple[str | int, ...]


@dataclass(frozen=True)
class ResolvedUnit:
    """A unit's contract fields (without image keys) and the image values still to be staged."""

    fields: dict[str, Any]
    image: str | None
    mask: str | None


def runs_here(module: Preprocessor, models_dir: Path) -> bool:
    """Weight-free and runnable, or an annotator the workers implement whose weights are installed."""
    if module.needs_weights:
        return annotator_available(module, models_dir)
    return module.runnable


def why_not(module: Preprocessor, models_dir: Path) -> str | None:
    """Why a job cannot use ``module`` here (None: it can)."""
    if runs_here(module, models_dir):
        return None
    if module.needs_weights:
        files = ", ".join(f"annotators/{name}" for name in module.weight_files) or "a model package"
        return f"needs annotator weights ({files}) that are not installed or that this farm does not run yet"
    return "is not an image preprocessor this farm runs"


def available_modules(models_dir: Path) -> list[str]:
    """The preprocessors a job may name on this farm (module_list order)."""
    return [name for name in module_list() if runs_here(PREPROCESSORS[name], models_dir)]


def _module(name: str, loc: Field, models_dir: Path) -> Preprocessor:
    try:
        module = resolve_module(name)
    except KeyError:
        raise FieldError(loc, f"unknown ControlNet preprocessor {name!r}; available: "
                              f"{', '.join(available_modules(models_dir))}") from None
    reason = why_not(module, models_dir)
    if reason is not None:
        raise FieldError(loc, f"ControlNet preprocessor {name!r} {reason}; available: "
                              f"{', '.join(available_modules(models_dir))}")
    return module


def _slider(value: float, slider: Slider | None, loc: Field, name: str) -> float:
    if slider is None or not slider.visible:
        return slider.default if slider is not None else 0.5
    if value == -1:
        return slider.default
    if not slider.minimum <= value <= slider.maximum:
        raise FieldError(loc, f"{name} for this preprocessor ({slider.label}) must be between {slider.minimum} and "
                              f"{slider.maximum}, or -1 for its default ({slider.default}); got {value}")
    return value


def _model(requested: str, module: Preprocessor, architecture: str | None, entries: list[ControlNetFile],
           models_dir: Path, loc: Field) -> ControlNetFile:
    if requested.strip() in ("", "None"):
        available = ", ".join(e.title for e in entries if e.loadable) or "none installed"
        raise FieldError(loc, f"a ControlNet model is needed for preprocessor {module.name!r}; available: {available}")
    entry = resolve_controlnet(models_dir, requested, loc, entries)
    if architecture is not None and entry.architecture != architecture:
        raise FieldError(loc, f"ControlNet model {entry.title!r} is made for {entry.architecture} checkpoints; this "
                              f"job's checkpoint is {architecture}")
    return entry


def resolve_units(units: list[UnitRequest], models_dir: Path, checkpoint_path: Path, img2img: bool,
                  base: Field = ("body", "controlnet")) -> list[ResolvedUnit]:
    """The enabled units, resolved; raises FieldError naming the unit's field (``base + (index, field)``)."""
    if not any(unit.enabled for unit in units):
        return []
    entries = list_controlnets(models_dir)
    architecture = checkpoint_architecture(checkpoint_path)
    resolved = []
    for index, unit in enumerate(units):
        if not unit.enabled:
            continue
        loc = (*base, index)
        module = _module(unit.module, (*loc, "module"), models_dir)
        entry = _model(unit.model, module, architecture, entries, models_dir, (*loc, "model"))
        res_slider, a_slider, b_slider = module.sliders()
        if unit.image is None and not img2img:
            raise FieldError((*loc, "image"), "a ControlNet unit needs an image on txt2img (on img2img a unit "
                                              "without one uses the init image)")
        processor_res = _slider(unit.processor_res, res_slider, (*loc, "processor_res"), "processor_res")
        fields = {
            "module": unit.module, "model": entry.name, "model_title": entry.title, "model_location": entry.location,
            "weight": unit.weight, "resize_mode": unit.resize_mode,
            "processor_res": int(processor_res) if float(processor_res).is_integer() else processor_res,
            "threshold_a": _slider(unit.threshold_a, a_slider, (*loc, "threshold_a"), "threshold_a"),
            "threshold_b": _slider(unit.threshold_b, b_slider, (*loc, "threshold_b"), "threshold_b"),
            "guidance_start": unit.guidance_start, "guidance_end": unit.guidance_end,
            "pixel_perfect": unit.pixel_perfect, "control_mode": unit.control_mode, "hr_option": unit.hr_option,
            "low_vram": unit.low_vram,
        }
        resolved.append(ResolvedUnit(fields, unit.image, unit.mask))
    return resolved
