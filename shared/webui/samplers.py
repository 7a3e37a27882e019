"""WebUI sampler and schedule names, and the diffusers scheduler each one means.

Pure data (no torch) so the API can validate names and the worker can build the
scheduler from the same table. Legacy combined names such as "DPM++ 2M Karras" split
into a sampler and a schedule exactly as the WebUI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.errors import FieldError

SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential")

_SCHEDULE_FLAGS: dict[str, dict[str, Any]] = {
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
}


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    scheduler_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    # What "Automatic" means for this sampler in the WebUI.
    default_schedule: str = "Uniform"
    # Schedules the diffusers scheduler can honour.
    schedules: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential")
    aliases: tuple[str, ...] = ()
    # Ancestral/SDE samplers draw noise every step (ENSD applies to them).
    stochastic: bool = False


_ONLY_AUTOMATIC = ("Automatic",)

SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++", "solver_order": 2}, "Karras", aliases=("k_dpmpp_2m",)),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, "Karras", aliases=("k_dpmpp_sde",),
                stochastic=True),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "Exponential",
                aliases=("k_dpmpp_2m_sde",), stochastic=True),
    SamplerSpec("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "Exponential",
                aliases=("k_dpmpp_3m_sde",), stochastic=True),
    # diffusers has no ancestral single-step DPM++ 2S; the single-step solver is the nearest.
    SamplerSpec("DPM++ 2S a", "DPMSolverSinglestepScheduler",
                {"algorithm_type": "dpmsolver++", "solver_order": 2}, "Karras", aliases=("k_dpmpp_2s_a",)),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, aliases=("k_euler_a", "k_euler_ancestral"),
                schedules=("Automatic", "Uniform"), stochastic=True),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, aliases=("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, aliases=("k_lms",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, aliases=("k_heun",)),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, "Karras", aliases=("k_dpm_2",)),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, "Karras", aliases=("k_dpm_2_a",),
                stochastic=True),
    SamplerSpec("DDIM", "DDIMScheduler", {}, schedules=_ONLY_AUTOMATIC, aliases=("ddim",)),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, schedules=_ONLY_AUTOMATIC,
                aliases=("plms",)),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, aliases=("unipc",)),
    SamplerSpec("LCM", "LCMScheduler", {}, schedules=_ONLY_AUTOMATIC, aliases=("k_lcm",)),
)

# Samplers the WebUI runs on the CompVis timestep grid ("leading" spacing in diffusers terms).
_COMPVIS_SAMPLERS = frozenset({"DDIM", "PLMS", "UniPC", "LCM"})

_BY_NAME: dict[str, SamplerSpec] = {}
for _spec in SAMPLERS:
    _BY_NAME[_spec.name.lower()] = _spec
    for _alias in _spec.aliases:
        _BY_NAME[_alias.lower()] = _spec


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler: WebUI names for the infotext, diffusers class and kwargs for the worker."""

    sampler_name: str
    schedule_type: str
    scheduler_class: str
    scheduler_kwargs: dict[str, Any]
    stochastic: bool


def sampler_names() -> list[str]:
    return [spec.name for spec in SAMPLERS]


def _split_legacy(name: str) -> tuple[str, str | None]:
    for schedule in SCHEDULE_TYPES:
        suffix = " " + schedule.lower()
        if name.lower().endswith(suffix) and name[: -len(suffix)].lower() in _BY_NAME:
            return name[: -len(suffix)], schedule
    return name, None


def resolve_sampler(sampler_name: str, scheduler: str | None = None) -> SamplerChoice:
    """Map WebUI sampler + schedule names to a diffusers scheduler; raise FieldError on unknown names."""
    base, legacy_schedule = _split_legacy(sampler_name.strip())
    spec = _BY_NAME.get(base.lower())
    if spec is None:
        raise FieldError(
            ("body", "sampler_name"),
            f"unknown sampler {sampler_name!r}; valid samplers: {', '.join(sampler_names())}",
        )
    requested = scheduler or "Automatic"
    if legacy_schedule and requested == "Automatic":
        requested = legacy_schedule
    canonical = {s.lower(): s for s in SCHEDULE_TYPES}.get(requested.strip().lower())
    if canonical is None:
        raise FieldError(
            ("body", "scheduler"),
            f"unknown schedule type {requested!r}; valid schedule types: {', '.join(SCHEDULE_TYPES)}",
        )
    if canonical not in spec.schedules:
        raise FieldError(
            ("body", "scheduler"),
            f"sampler {spec.name!r} supports the schedule types {', '.join(spec.schedules)}, not {canonical!r}",
        )
    effective = spec.default_schedule if canonical == "Automatic" else canonical
    if effective not in spec.schedules:
        effective = "Uniform"
    kwargs = dict(spec.kwargs)
    if spec.name not in _COMPVIS_SAMPLERS:
        # The WebUI's k-diffusion samplers start at the model's largest sigma (t = 999), like "linspace".
        kwargs["timestep_spacing"] = "linspace"
    if spec.schedules != _ONLY_AUTOMATIC:
        kwargs.update(_SCHEDULE_FLAGS[effective])
    return SamplerChoice(spec.name, canonical, spec.scheduler_class, kwargs, spec.stochastic)
