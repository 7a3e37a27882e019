"""The denoising loop: one image at a time, classifier-free guidance the WebUI's way.

Why one image at a time: batched CPU matmuls are not bit-identical to unbatched ones, and image k of
a batch must equal a one-image job with its seed. Each image gets its own scheduler (multistep
solvers keep per-sample history) and its own noise generator; the UNet sees the same batch
composition ``[cond_1 .. cond_n, uncond]`` whatever the job's batch size, so results never depend on
it. The price is GPU throughput on large batches; the WebUI's own ``batch_cond_uncond`` layout is kept.

Guidance is composable diffusion: ``uncond + sum(w_i * cfg * (cond_i - uncond))``
(``CFGDenoiser.combine_denoised``). The step counter that picks scheduled prompts counts model
evaluations from 0, as ``CFGDenoiser.step`` does. For inpainting, the WebUI blends the *denoised*
prediction with the original latent after every evaluation; diffusers schedulers take the noise
prediction, so the blend is done on x0 and converted back to the noise it implies.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shared.webui.samplers import SamplerChoice, resolve_sampler
from worker.engine.conditioning import JobConditioning, StepConditioning
from worker.engine.scheduling import build_scheduler


@dataclass(frozen=True)
class PhasePlan:
    """One sampling pass: which scheduler, how many steps, and where in its schedule it starts."""

    choice: SamplerChoice
    steps: int  # the schedule's length (set_timesteps)
    start: int  # first step index used (0 for txt2img)
    evals: int  # model evaluations this pass makes per image
    schedule_steps: int  # the step count prompt schedules are computed for


def plan_phase(
    scheduler_config: dict[str, Any], sampler_name: str, schedule_type: str, steps: int,
    denoising_strength: float | None = None, fixed_steps: bool = False,
) -> PhasePlan:
    """txt2img (no strength), img2img (``setup_img2img_steps``), or the hires pass (``fixed_steps``).

    img2img runs ``int(strength * steps) + 1`` of ``steps`` steps (the WebUI's img2img_fix_steps off);
    the hires pass runs exactly ``steps`` steps of a schedule stretched to ``steps / strength``.
    """
    choice = resolve_sampler(sampler_name, schedule_type)
    total, start = steps, 0
    if denoising_strength is not None:
        strength = min(max(float(denoising_strength), 0.0), 0.999)
        if fixed_steps:
            total = int(steps / strength) if strength > 0 else steps
            start = max(total - steps, 0)
        else:
            t_enc = int(strength * steps)
            start = steps - t_enc - 1
    scheduler = build_scheduler(scheduler_config, sampler_name, schedule_type)
    scheduler.set_timesteps(total)
    order = int(getattr(scheduler, "order", 1))
    evals = len(scheduler.timesteps) - start * order
    # The WebUI computes prompt schedules over sampler_config.total_steps: twice the steps for
    # second-order samplers, whose steps each evaluate the model twice.
    schedule_steps = steps * 2 if order == 2 else steps
    return PhasePlan(choice, total, start, evals, schedule_steps)


def new_scheduler(
    scheduler_config: dict[str, Any], plan: PhasePlan, seed: int, device: torch.device | str = "cpu"
) -> tuple[Any, torch.Tensor]:
    """A fresh scheduler for one image, positioned at the plan's start, and the timesteps to run."""
    scheduler = build_scheduler(scheduler_config, plan.choice.sampler_name, plan.choice.schedule_type)
    scheduler.set_timesteps(plan.steps, device=device)
    start_index = plan.start * int(getattr(scheduler, "order", 1))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_index)
    if hasattr(scheduler, "noise_sampler_seed"):
        # DPM++ SDE's Brownian tree is seeded with the image's seed, as the WebUI seeds it.
        scheduler.noise_sampler_seed = [int(seed)]
    return scheduler, scheduler.timesteps[start_index:]


@dataclass
class InpaintBlend:
    """Keep ``init_latent`` where ``keep`` is 1; regenerate where ``regenerate`` is 1 (both (C, h, w))."""

    init_latent: torch.Tensor
    keep: torch.Tensor
    regenerate: torch.Tensor


def noise_levels(scheduler: Any, timestep: Any, device: torch.device) -> tuple[float, float]:
    """``(alpha, sigma)`` with ``x_t = alpha * x0 + sigma * eps`` for the sample the scheduler holds now."""
    if float(scheduler.init_noise_sigma) > 1.0:  # k-diffusion style: x = x0 + sigma * eps
        c_in = float(scheduler.scale_model_input(torch.ones(1, device=device), timestep)[0])
        return 1.0, max(1.0 / (c_in * c_in) - 1.0, 0.0) ** 0.5
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:  # DPM-Solver / UniPC: variance-preserving sample at sigmas[step_index]
        index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        sigma = float(sigmas[index])
        alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
        return alpha, sigma * alpha
    alpha_prod = float(scheduler.alphas_cumprod[int(timestep)])
    return alpha_prod**0.5, (1.0 - alpha_prod) ** 0.5


def blend_noise_prediction(
    scheduler: Any, sample: torch.Tensor, timestep: Any, eps: torch.Tensor, blend: InpaintBlend
) -> torch.Tensor:
    """The noise prediction whose x0 is the WebUI's blend of denoised and original latents."""
    alpha, sigma = noise_levels(scheduler, timestep, sample.device)
    if sigma < 1e-8:
        return eps
    denoised = (sample - sigma * eps) / alpha
    blended = denoised * blend.regenerate + blend.init_latent * blend.keep
    return (sample - alpha * blended) / sigma


def added_cond_kwargs(cond: StepConditioning, rows: str, dtype: torch.dtype, device: torch.device
                      ) -> dict[str, Any]:
    """SDXL's ``added_cond_kwargs`` (pooled text embeds, size ``time_ids``) for the ``rows`` of a UNet batch:
    ``"all"`` (conds then uncond), ``"conds"`` or ``"uncond"``; empty for SD1.x conditioning."""
    if cond.conds_pooled is None or cond.uncond_pooled is None or cond.time_ids is None:
        return {}
    parts = {"conds": [cond.conds_pooled], "uncond": [cond.uncond_pooled[None]],
             "all": [cond.conds_pooled, cond.uncond_pooled[None]]}[rows]
    pooled = torch.cat(parts).to(device=device, dtype=dtype)
    time_ids = cond.time_ids.to(device=device, dtype=dtype)[None].repeat(pooled.shape[0], 1)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def guided_noise(unet: Any, model_input: torch.Tensor, timestep: Any, cond: StepConditioning,
                 cfg_scale: float) -> torch.Tensor:
    """Composable classifier-free guidance for one image ``(1, C, h, w)``."""
    dtype = unet.dtype
    conds = cond.conds.to(dtype)
    uncond = cond.uncond.to(dtype)[None]
    n = conds.shape[0]
    x = model_input.to(dtype)
    if conds.shape[1] == uncond.shape[1]:
        out = unet(x.repeat(n + 1, 1, 1, 1), timestep, encoder_hidden_states=torch.cat([conds, uncond]),
                   **added_cond_kwargs(cond, "all", dtype, x.device)).sample
    else:  # different token counts: the WebUI runs cond and uncond as separate batches
        out = torch.cat([
            unet(x.repeat(n, 1, 1, 1), timestep, encoder_hidden_states=conds,
                 **added_cond_kwargs(cond, "conds", dtype, x.device)).sample,
            unet(x, timestep, encoder_hidden_states=uncond,
                 **added_cond_kwargs(cond, "uncond", dtype, x.device)).sample,
        ])
    out = out.float()
    denoised_uncond = out[-1:]
    result = denoised_uncond.clone()
    for index, weight in enumerate(cond.weights):
        result += (out[index : index + 1] - denoised_uncond) * (weight * cfg_scale)
    return result


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


@torch.no_grad()
def run_phase(
    unet: Any, scheduler: Any, timesteps: torch.Tensor, latents: torch.Tensor, conditioning: JobConditioning,
    cfg_scale: float, generator: torch.Generator, on_eval: Callable[[], None],
    blend: InpaintBlend | None = None,
) -> torch.Tensor:
    """Denoise one image's float32 latents over ``timesteps``; ``on_eval`` runs after each evaluation."""
    kwargs = _step_kwargs(scheduler, generator)
    for index, timestep in enumerate(timesteps):
        step_cond = conditioning.at_step(index)
        model_input = scheduler.scale_model_input(latents, timestep)
        eps = guided_noise(unet, model_input, timestep, step_cond, cfg_scale)
        if blend is not None:
            eps = blend_noise_prediction(scheduler, latents, timestep, eps, blend)
        latents = scheduler.step(eps, timestep, latents, return_dict=False, **kwargs)[0].float()
        on_eval()
    return latents


def start_latents(scheduler: Any, timesteps: torch.Tensor, noise: torch.Tensor,
                  init_latent: torch.Tensor | None) -> torch.Tensor:
    """txt2img: noise at the schedule's first noise level; img2img: the init latent noised to it."""
    if init_latent is None:
        return noise * scheduler.init_noise_sigma
    if len(timesteps) == 0:
        return init_latent
    return scheduler.add_noise(init_latent, noise, timesteps[:1])
