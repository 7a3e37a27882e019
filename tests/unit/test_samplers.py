"""WebUI sampler and schedule names resolve to diffusers schedulers; bad names teach."""

from __future__ import annotations

import pytest

from shared.errors import FieldError
from shared.webui.samplers import resolve_sampler, sampler_names

REQUIRED = ["Euler", "Euler a", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
            "DPM++ 2S a", "DDIM", "PLMS", "UniPC", "LCM"]


def test_every_required_sampler_is_known() -> None:
    assert set(REQUIRED) <= set(sampler_names())


def test_legacy_combined_name_splits_into_sampler_and_schedule() -> None:
    choice = resolve_sampler("DPM++ 2M Karras")
    assert (choice.sampler_name, choice.schedule_type) == ("DPM++ 2M", "Karras")
    assert choice.scheduler_class == "DPMSolverMultistepScheduler"
    assert choice.scheduler_kwargs["use_karras_sigmas"] is True


def test_automatic_means_the_samplers_own_default() -> None:
    assert resolve_sampler("DPM++ 2M").scheduler_kwargs.get("use_karras_sigmas") is True
    assert resolve_sampler("Euler").scheduler_kwargs == {"timestep_spacing": "linspace"}
    assert "timestep_spacing" not in resolve_sampler("DDIM").scheduler_kwargs
    assert resolve_sampler("Euler a").stochastic and not resolve_sampler("Euler").stochastic


def test_names_are_case_insensitive_and_aliases_work() -> None:
    assert resolve_sampler("euler A").sampler_name == "Euler a"
    assert resolve_sampler("k_dpmpp_2m", "karras").schedule_type == "Karras"


def test_unknown_sampler_lists_valid_ones() -> None:
    with pytest.raises(FieldError) as err:
        resolve_sampler("Euler z")
    assert err.value.field == ("body", "sampler_name")
    assert "DPM++ 2M" in err.value.message and "UniPC" in err.value.message


def test_schedule_not_supported_by_sampler() -> None:
    with pytest.raises(FieldError) as err:
        resolve_sampler("DDIM", "Karras")
    assert err.value.field == ("body", "scheduler")
