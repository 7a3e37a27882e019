"""The denoising loop: every image of a batch in one UNet call per step, guidance the WebUI's way.

Layout (the WebUI's ``batch_cond_uncond``): the rows of one call are every image's cond rows (one per
``AND`` sub-prompt) followed by every image's uncond row. Rows whose conditioning has a different
number of tokens (prompts of different 75-token chunk counts) cannot share a tensor: they go in one call
per length, in order of first appearance. The WebUI pads instead (``stack_conds`` repeats the last
vector; ``pad_cond_uncond`` adds empty chunks) only among images of one WebUI batch, which share a
prompt; padding another user's prompt would change that user's image, so we never pad across images.

Each image keeps what it owns: its conditioning schedule (scheduled prompts are picked per model
evaluation, counted from 0 as ``CFGDenoiser.step`` counts them), its CFG scale and ``AND`` weights, its
CPU noise generator (diffusers' schedulers draw per-sample noise from a list of generators, the
Brownian tree of DPM++ SDE is seeded per sample) and its inpainting blend. The scheduler state is one
for the batch: all images share timesteps, and multistep history is kept per row. An image leaves the
batch between two evaluations (its job was canceled or ran out of time) by dropping its row from the
latents, the generators and every per-sample tensor of the scheduler (:func:`drop_rows`).

Guidance is composable diffusion: ``uncond + sum(w_i * cfg * (cond_i - uncond))``
(``CFGDenoiser.combine_denoised``). For inpainting, the WebUI blends the *denoised* prediction with the
original latent after every evaluation; diffusers schedulers take the noise prediction, so the blend is
done on x0 and converted back to the noise it implies.

Batched kernels are not bit-identical to unbatched ones, so an image in a batch matches its solo render
within the tolerance the README states; a batch of one is the solo render, pixel for pixel.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shared.webui.samplers import SamplerChoice, resolve_sampler
from worker.engine.conditioning import JobConditioning, StepConditioning
from worker.engine.controlnet import ControlRow, ImageControl, SamplerStep, residuals, sampler_steps
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
    scheduler_config: dict[str, Any], plan: PhasePlan, seeds: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[Any, torch.Tensor]:
    """A fresh scheduler for a batch (one seed per image), positioned at the plan's start, and the
    timesteps to run."""
    scheduler = build_scheduler(scheduler_config, plan.choice.sampler_name, plan.choice.schedule_type)
    scheduler.set_timesteps(plan.steps, device=device)
    start_index = plan.start * int(getattr(scheduler, "order", 1))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_index)
    if hasattr(scheduler, "noise_sampler_seed"):
        # DPM++ SDE's Brownian tree is seeded with the image's seed, as the WebUI seeds it.
        scheduler.noise_sampler_seed = [int(seed) for seed in seeds]
    return scheduler, scheduler.timesteps[start_index:]


@dataclass
class InpaintBlend:
    """Keep ``init_latent`` where ``keep`` is 1; regenerate where ``regenerate`` is 1 (each (C, h, w))."""

    init_latent: torch.Tensor
    keep: torch.Tensor
    regenerate: torch.Tensor


@dataclass
class DenoiseItem:
    """One image of a denoising pass: what it is conditioned on, its guidance scale and its noise."""

    key: Hashable
    conditioning: JobConditioning
    cfg_scale: float
    generator: torch.Generator
    blend: InpaintBlend | None = None
    control: ImageControl | None = None  # its ControlNet units in this pass


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


@dataclass(frozen=True)
class _Row:
    """One row of a UNet call: which image it belongs to and what it is conditioned on."""

    image: int
    cond: bool  # False: the image's uncond row
    hidden: torch.Tensor  # (tokens, width)
    pooled: torch.Tensor | None  # SDXL
    time_ids: torch.Tensor | None  # SDXL


def _rows(steps: Sequence[StepConditioning]) -> list[_Row]:
    """Every image's cond rows, then every image's uncond row (``batch_cond_uncond``)."""
    rows = []
    for image, cond in enumerate(steps):
        for j in range(cond.conds.shape[0]):
            pooled = cond.conds_pooled[j] if cond.conds_pooled is not None else None
            rows.append(_Row(image, True, cond.conds[j], pooled, cond.time_ids))
    rows += [_Row(image, False, cond.uncond, cond.uncond_pooled, cond.time_ids) for image, cond in enumerate(steps)]
    return rows


@dataclass(frozen=True)
class ControlAt:
    """The ControlNet units of a call's images (by image index), and where the evaluation is in its pass."""

    controls: Sequence[ImageControl | None]
    at: SamplerStep


def _unet_call(unet: Any, x: torch.Tensor, timestep: Any, rows: Sequence[_Row],
               control: ControlAt | None = None) -> torch.Tensor:
    dtype = unet.dtype
    hidden = torch.stack([row.hidden for row in rows]).to(dtype)
    kwargs: dict[str, Any] = {}
    added: dict[str, torch.Tensor] | None = None
    if all(row.pooled is not None and row.time_ids is not None for row in rows):
        pooled = torch.stack([row.pooled for row in rows if row.pooled is not None]).to(device=x.device, dtype=dtype)
        time_ids = torch.stack([row.time_ids for row in rows if row.time_ids is not None]).to(device=x.device,
                                                                                             dtype=dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        kwargs["added_cond_kwargs"] = added
    inputs = x[[row.image for row in rows]]
    if control is not None:
        found = residuals(inputs, timestep, hidden, added, [ControlRow(row.image, row.cond) for row in rows],
                          control.controls, control.at, dtype)
        if found is not None:
            kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"] = found
    return unet(inputs, timestep, encoder_hidden_states=hidden, **kwargs).sample.float()


def guided_noise(unet: Any, model_input: torch.Tensor, timestep: Any, steps: Sequence[StepConditioning],
                 cfg_scales: Sequence[float], control: ControlAt | None = None) -> torch.Tensor:
    """Composable classifier-free guidance for a batch ``(n, C, h, w)``: image i conditioned on ``steps[i]``
    with scale ``cfg_scales[i]`` (and ``control.controls[i]``'s ControlNet units); one UNet call per conditioning
    length (one in the common case)."""
    rows = _rows(steps)
    by_length: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        by_length.setdefault(int(row.hidden.shape[0]), []).append(index)
    x = model_input.to(unet.dtype)
    out: list[torch.Tensor] = [x[:0]] * len(rows)
    for indices in by_length.values():
        result = _unet_call(unet, x, timestep, [rows[i] for i in indices], control)
        for position, index in enumerate(indices):
            out[index] = result[position : position + 1]
    uncond_start = len(rows) - len(steps)
    guided, cond_row = [], 0
    for image, cond in enumerate(steps):
        denoised_uncond = out[uncond_start + image]
        combined = denoised_uncond.clone()
        for weight in cond.weights:
            combined += (out[cond_row] - denoised_uncond) * (weight * cfg_scales[image])
            cond_row += 1
        guided.append(combined)
    return torch.cat(guided)


def _take(value: Any, keep: list[int], rows: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[0] == rows:
        return value[keep]
    if isinstance(value, list) and any(isinstance(v, torch.Tensor) and v.ndim == 4 for v in value):
        return [_take(v, keep, rows) for v in value]
    return value


def drop_rows(scheduler: Any, keep: list[int], rows: int) -> None:
    """Keep only rows ``keep`` of every per-sample tensor the scheduler holds (multistep history, the
    stored sample of second-order solvers, DPM++ SDE's per-seed Brownian trees)."""
    for name, value in list(vars(scheduler).items()):
        taken = _take(value, keep, rows)
        if taken is not value:
            setattr(scheduler, name, taken)
    seeds = getattr(scheduler, "noise_sampler_seed", None)
    if isinstance(seeds, list) and len(seeds) == rows:
        scheduler.noise_sampler_seed = [seeds[i] for i in keep]
    tree = getattr(getattr(scheduler, "noise_sampler", None), "tree", None)
    trees = getattr(tree, "trees", None)
    if isinstance(trees, list) and len(trees) == rows:
        tree.trees = [trees[i] for i in keep]


AfterEval = Callable[[list[Hashable]], set[Hashable]]


def _blended(scheduler: Any, latents: torch.Tensor, timestep: Any, eps: torch.Tensor,
             items: Sequence[DenoiseItem]) -> torch.Tensor:
    masked = [i for i, item in enumerate(items) if item.blend is not None]
    if not masked:
        return eps
    blends = [item.blend for item in items if item.blend is not None]
    stacked = InpaintBlend(torch.stack([b.init_latent for b in blends]), torch.stack([b.keep for b in blends]),
                           torch.stack([b.regenerate for b in blends]))
    if len(masked) == len(items):
        return blend_noise_prediction(scheduler, latents, timestep, eps, stacked)
    eps = eps.clone()
    eps[masked] = blend_noise_prediction(scheduler, latents[masked], timestep, eps[masked], stacked)
    return eps


@torch.no_grad()
def run_phase(
    unet: Any, scheduler: Any, timesteps: torch.Tensor, latents: torch.Tensor, items: list[DenoiseItem],
    after_eval: AfterEval,
) -> tuple[torch.Tensor, list[DenoiseItem]]:
    """Denoise a batch's float32 latents ``(n, C, h, w)`` (row i is ``items[i]``) over ``timesteps``.

    After each evaluation ``after_eval(keys still in the batch)`` names the keys to drop; their rows leave
    the batch before the next one. Returns the latents of the images that stayed, and their items."""
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # once, off the step
    order = int(getattr(scheduler, "order", 1))
    step_of = sampler_steps(len(timesteps), order)
    pass_steps = (step_of[-1] + 1) if step_of else 0
    for index, timestep in enumerate(timesteps):
        if not items:
            break
        model_input = scheduler.scale_model_input(latents, timestep)
        steps = [item.conditioning.at_step(index) for item in items]
        control = None
        if any(item.control is not None for item in items):
            control = ControlAt([item.control for item in items], SamplerStep(step_of[index], pass_steps))
        eps = guided_noise(unet, model_input, timestep, steps, [item.cfg_scale for item in items], control)
        eps = _blended(scheduler, latents, timestep, eps, items)
        kwargs = {"generator": [item.generator for item in items]} if takes_generator else {}
        latents = scheduler.step(eps, timestep, latents, return_dict=False, **kwargs)[0].float()
        dropped = after_eval([item.key for item in items])
        if dropped:
            keep = [i for i, item in enumerate(items) if item.key not in dropped]
            drop_rows(scheduler, keep, len(items))
            latents, items = latents[keep], [items[i] for i in keep]
    return latents, items


def start_latents(scheduler: Any, timesteps: torch.Tensor, noise: torch.Tensor,
                  init_latent: torch.Tensor | None) -> torch.Tensor:
    """txt2img: noise at the schedule's first noise level; img2img: the init latent noised to it."""
    if init_latent is None:
        return noise * scheduler.init_noise_sigma
    if len(timesteps) == 0:
        return init_latent
    return scheduler.add_noise(init_latent, noise, timesteps[:1])
