"""Build the diffusers scheduler a WebUI sampler name means (see shared.webui.samplers)."""

from __future__ import annotations

from typing import Any

import diffusers

from shared.webui.samplers import resolve_sampler

# Every schedule flag is set explicitly so nothing carries over from the config it is built from.
_SIGMA_FLAGS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}


def build_scheduler(base_config: Any, sampler_name: str, schedule_type: str) -> Any:
    """A fresh scheduler per job, built from the checkpoint's pristine scheduler config."""
    choice = resolve_sampler(sampler_name, schedule_type)
    cls = getattr(diffusers, choice.scheduler_class)
    accepted = set(cls.__init__.__code__.co_varnames)
    kwargs = {k: v for k, v in {**_SIGMA_FLAGS, **choice.scheduler_kwargs}.items() if k in accepted}
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    return cls.from_config(config, **kwargs)
