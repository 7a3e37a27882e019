"""ControlNet in the denoising loop, with the extension's semantics (``scripts/hook.py``, ``scripts/controlnet.py``).

Per unit of a job, prepared once (:func:`prepare_units`): the control image (the unit's, or the init image on
img2img with img2img's resize mode) goes through its preprocessor (:mod:`shared.controlnet.preprocessors`, with
pixel perfect choosing the resolution from the first pass's size), is resized to each pass's size by the unit's
resize mode (:mod:`shared.controlnet.detectmap`) and becomes a ``[1, 3, H, W]`` RGB hint in ``[0, 1]``.

At every model evaluation (:func:`residuals`) each active unit's ControlNet runs on the rows of the UNet call that
it steers, and its residuals are scaled and summed over units:

- **Weight and control mode.** "Balanced": ``weight`` on every residual. "My prompt is more important" and
  "ControlNet is more important": soft injection, ``weight * 0.825 ** (12 - i)`` for residual ``i`` (the deepest,
  the middle block's, keeps ``weight``); canny and mlsd units get it in the hires pass whatever their mode.
  "ControlNet is more important" also leaves the uncond rows alone, so CFG amplifies the control. The extension
  counts 13 residuals for SD1.x (12 skips + middle) and takes the first 10 of those scales for SDXL's 10; for other
  sizes (our tiny demo models) SD1.x-shaped ControlNets count back from the middle block, SDXL ones take the first.
- **Guidance window.** A unit is active while ``guidance_start <= s / total <= guidance_end``, ``s`` being the
  WebUI's ``state.sampling_step`` during the evaluation (the sampler step, updated after each step's model call, so
  it lags one step) and ``total`` the pass's sampler steps; the hires pass is measured on its own steps.
- **hr_option.** "Low res only" units sit out the hires pass, "High res only" units the first pass.
- **Batches.** Each image brings its own hint (and per-job weight, mode and window); rows of images whose unit is
  inactive are not sent through that ControlNet. Jobs batched together share their ControlNet models (batch key).

A unit with weight 0 is never evaluated, so it renders exactly what the job renders without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.controlnet.detectmap import ResizeMode, hint_array, parse_resize_mode, prepare_detected_map, rgb_array
from shared.controlnet.preprocessors import (
    PreprocessorUnavailable,
    pixel_perfect_resolution,
    resolve_module,
    run_preprocessor,
)
from shared.controlnet.units import ControlMode, ControlUnit, HiresOption
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.models.architecture import UnsupportedCheckpointError
from worker.engine.annotators import run_annotator
from worker.engine.img2img import read_stored_image

ControlNetLoader = Callable[[ControlUnit], Any]  # a unit's ControlNetModel, loaded (or cached) by its location
SOFT_BASE = 0.825
EXTENSION_RESIDUALS = 13  # SD1.x: 12 input-block zero convs + the middle block's
_FORCED_SOFT_IN_HIRES = ("canny", "mlsd")


@dataclass(frozen=True)
class UnitPlan:
    """One unit of one job, ready for the loop: its model, its hint per pass, and how it steers."""

    position: int
    model: Any
    hint: torch.Tensor  # [1, 3, H, W] at the first pass's size
    hr_hint: torch.Tensor | None  # at the hires pass's size
    weight: float
    mode: ControlMode
    start: float
    end: float
    hr_option: HiresOption
    soft_in_hires: bool

    def hint_for(self, hires: bool) -> torch.Tensor | None:
        if hires:
            return None if self.hr_option == HiresOption.LOW_RES_ONLY else self.hr_hint
        return None if self.hr_option == HiresOption.HIGH_RES_ONLY else self.hint


@dataclass(frozen=True)
class ImageControl:
    """An image's units in one pass (first or hires)."""

    units: tuple[UnitPlan, ...]
    hires: bool = False


@dataclass(frozen=True)
class SamplerStep:
    """Where an evaluation is in its pass, as the WebUI's ``state`` counts it: sampler step and pass length."""

    step: int
    total: int


def sampler_steps(evals: int, order: int) -> list[int]:
    """The sampler step each model evaluation of a pass belongs to. Second-order schedulers (Heun, DPM2) in
    diffusers evaluate once for step 0 and twice for every later step."""
    if order == 2:
        return [(e + 1) // 2 for e in range(evals)]
    return list(range(evals))


def unit_active(unit: UnitPlan, at: SamplerStep) -> bool:
    """The extension's ``guidance_schedule_handler``: ``state.sampling_step`` lags the step being evaluated by one."""
    if unit.weight == 0 or at.total <= 0:
        return False
    fraction = max(at.step - 1, 0) / at.total
    return unit.start <= fraction <= unit.end


def unit_scales(unit: UnitPlan, residuals: int, sdxl: bool, hires: bool) -> list[float]:
    """The weight of each residual (shallowest first, middle block last)."""
    soft = unit.mode != ControlMode.BALANCED or (hires and unit.soft_in_hires)
    if not soft:
        return [unit.weight] * residuals
    if sdxl:
        scales = [unit.weight * SOFT_BASE ** float(EXTENSION_RESIDUALS - 1 - i) for i in range(EXTENSION_RESIDUALS)]
        return (scales + [unit.weight] * residuals)[:residuals]
    return [unit.weight * SOFT_BASE ** float(residuals - 1 - i) for i in range(residuals)]


@dataclass(frozen=True)
class ControlRow:
    """What :func:`residuals` needs of one row of a UNet call."""

    image: int
    cond: bool  # False: the image's uncond row


def residuals(
    x: torch.Tensor, timestep: Any, hidden: torch.Tensor, added_cond: dict[str, torch.Tensor] | None,
    rows: Sequence[ControlRow], controls: Sequence[ImageControl | None], at: SamplerStep, out_dtype: torch.dtype,
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """The summed, scaled ControlNet residuals for the rows of one UNet call (``x``, ``hidden`` and ``added_cond``
    already row-ordered), or None when no unit is active on any row."""
    by_model: dict[int, list[tuple[int, UnitPlan, torch.Tensor, bool]]] = {}
    for row_index, row in enumerate(rows):
        control = controls[row.image] if row.image < len(controls) else None
        if control is None:
            continue
        for unit in control.units:
            hint = unit.hint_for(control.hires)
            if hint is None or not unit_active(unit, at) or (unit.mode == ControlMode.CONTROL and not row.cond):
                continue
            by_model.setdefault(id(unit.model), []).append((row_index, unit, hint, control.hires))
    if not by_model:
        return None
    total: list[torch.Tensor] | None = None
    for entries in by_model.values():
        model = entries[0][1].model
        index = [row for row, _, _, _ in entries]
        dtype = model.dtype
        cond = {k: v[index].to(dtype) for k, v in added_cond.items()} if added_cond else None
        kwargs: dict[str, Any] = {"added_cond_kwargs": cond} if cond is not None else {}
        down, mid = model(
            x[index].to(dtype), timestep, encoder_hidden_states=hidden[index].to(dtype),
            controlnet_cond=torch.cat([hint for _, _, hint, _ in entries]).to(x.device, dtype), conditioning_scale=1.0,
            return_dict=False, **kwargs,
        )
        outputs = [*down, mid]
        sdxl = getattr(model.config, "addition_embed_type", None) == "text_time"
        scales = torch.tensor([unit_scales(unit, len(outputs), sdxl, hires) for _, unit, _, hires in entries],
                              dtype=torch.float32, device=x.device)
        if total is None:
            total = [torch.zeros((len(rows), *o.shape[1:]), dtype=torch.float32, device=x.device) for o in outputs]
        rows_at = torch.tensor(index, device=x.device)
        for i, output in enumerate(outputs):
            total[i].index_add_(0, rows_at, output.float() * scales[:, i].view(-1, 1, 1, 1))
    assert total is not None
    cast = [t.to(out_dtype) for t in total]
    return cast[:-1], cast[-1]


# -- preparing a job's units ----------------------------------------------------------------------------------


def _to_hint(detected: np.ndarray, width: int, height: int, mode: ResizeMode) -> torch.Tensor:
    resized = prepare_detected_map(detected, width, height, mode)
    return torch.from_numpy(np.ascontiguousarray(hint_array(resized))).permute(2, 0, 1)[None].float()


def prepare_units(
    spec: RenderSpec, load_image: Callable[[str], bytes] | None, load_model: ControlNetLoader,
    hires_size: tuple[int, int] | None, models_dir: Path, device: str = "cpu",
) -> tuple[UnitPlan, ...]:
    """Every unit of ``spec`` read, preprocessed and resized; a bad image or unavailable preprocessor is a
    FieldError naming the unit. ``hires_size``: (width, height) of the hires pass, when it runs; ``models_dir``
    holds the annotator weights, run on ``device``."""
    plans = []
    width, height = spec.width // 8 * 8, spec.height // 8 * 8
    for position, unit in enumerate(spec.controlnet):
        field: tuple[str | int, ...] = ("body", "controlnet", position, "image")
        mode = unit.resize_mode
        if unit.image is not None:
            source = read_stored_image(unit.image, load_image, field)
        elif spec.init_images:
            source = read_stored_image(spec.init_images[0], load_image, ("body", "init_images", 0))
            mode = parse_resize_mode(min(spec.resize_mode, 2) if spec.resize_mode != 3 else 0)
        else:
            raise FieldError(field, f"controlnet[{position}]: no control image (txt2img needs one per unit)")
        image = rgb_array(source)
        if unit.mask is not None:  # the extension's canvas-scribble rule: a mask that is not all on or off is the input
            mask = read_stored_image(unit.mask, load_image, (*field[:-1], "mask"))
            alpha = np.asarray(mask.convert("L"), dtype=np.uint8)
            if not (alpha <= 5).all() and not (alpha >= 250).all() and "inpaint" not in unit.module:
                image = np.repeat(alpha[:, :, None], 3, axis=2)
        resolution = unit.processor_res
        if unit.pixel_perfect:
            resolution = pixel_perfect_resolution(image.shape[:2], width, height, mode)
        try:
            if resolve_module(unit.module).needs_weights:
                detected = run_annotator(unit.module, image, resolution, unit.threshold_a, unit.threshold_b,
                                         models_dir, device)
            else:
                detected = run_preprocessor(unit.module, image, resolution, unit.threshold_a, unit.threshold_b,
                                            seed=(spec.seed + spec.subseed) & 0xFFFFFFFF)
        except PreprocessorUnavailable as exc:
            raise FieldError(("body", "controlnet", position, "module"), f"controlnet[{position}]: {exc}") from exc
        # Hints live on the device from here on: one copy per job, not one per step.
        hr_hint = _to_hint(detected, *hires_size, mode).to(device) if hires_size is not None else None
        try:
            model = load_model(unit)
        except UnsupportedCheckpointError as exc:
            raise FieldError(("body", "controlnet", position, "model"), f"controlnet[{position}]: {exc}") from exc
        plans.append(UnitPlan(
            position=position, model=model, hint=_to_hint(detected, width, height, mode).to(device), hr_hint=hr_hint,
            weight=unit.weight, mode=unit.control_mode, start=unit.guidance_start, end=unit.guidance_end,
            hr_option=unit.hr_option if hires_size is not None else HiresOption.BOTH,
            soft_in_hires=any(name in unit.module for name in _FORCED_SOFT_IN_HIRES),
        ))
    return tuple(plans)
