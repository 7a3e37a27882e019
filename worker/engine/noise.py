"""Per-image noise exactly as the WebUI draws it with "RNG: CPU" (``modules/rng.py`` ``ImageRNG``).

Why per image: image k of a batch must be the image a one-image job with its seed gives (exactly with
``batch_invariant``, within the stated tolerance in a shared UNet batch), so every image owns its
generators and nothing it draws depends on its neighbours. Why on the CPU: a seed then
means the same picture on any GPU. The initial noise (with variation seed, slerp and "seed resize
from") comes first from the image's generator; the sampler's per-step noise continues that same
generator, or a fresh one seeded with ``seed + ENSD`` when eta_noise_seed_delta is set, as the WebUI
does for every sampler (only the stochastic ones actually draw from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.jobs.contract import RenderSpec

LATENT_CHANNELS = 4
LATENT_FACTOR = 8  # the WebUI's opt_f


def cpu_randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The first tensor a fresh CPU generator seeded with ``seed`` draws (the WebUI's ``randn(seed, shape)``)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The WebUI's slerp, shapes and all: it normalises along dim 1 of one image's ``(C, H, W)`` noise.

    Kept verbatim (including the linear fallback that swaps the weights) because variation seeds
    must reproduce WebUI images.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


@dataclass(frozen=True)
class SeedPlan:
    """The seeds of one image: its seed, its variation seed and how strongly the variation mixes in."""

    seed: int
    subseed: int
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    eta_noise_seed_delta: int = 0


def job_seed_plans(spec: RenderSpec, count: int | None = None) -> list[SeedPlan]:
    """Seeds of the job's ``count`` images (default batch_size x n_iter), in output order.

    With a variation strength of 0, image k uses seed + k; with variations every image keeps the seed
    and the variation seed counts up instead, exactly as the WebUI assigns ``all_seeds``.
    """
    if count is None:
        count = spec.image_count
    strength = spec.subseed_strength
    return [
        SeedPlan(
            seed=spec.seed + (k if strength == 0 else 0),
            subseed=spec.subseed + k,
            subseed_strength=strength,
            seed_resize_from_w=spec.seed_resize_from_w,
            seed_resize_from_h=spec.seed_resize_from_h,
            eta_noise_seed_delta=spec.eta_noise_seed_delta,
        )
        for k in range(count)
    ]


class ImageNoise:
    """One image's random numbers for one sampling pass (a new one per hires pass, like the WebUI)."""

    def __init__(self, plan: SeedPlan, shape: tuple[int, int, int]) -> None:
        self.plan = plan
        self.shape = shape
        self.generator = torch.Generator("cpu").manual_seed(int(plan.seed))

    def initial(self) -> torch.Tensor:
        """The pass's starting noise ``(C, H, W)`` in float32 on the CPU; re-seeds for ENSD afterwards."""
        plan, shape = self.plan, self.shape
        resized = plan.seed_resize_from_w > 0 and plan.seed_resize_from_h > 0
        noise_shape = (
            (shape[0], plan.seed_resize_from_h // LATENT_FACTOR, plan.seed_resize_from_w // LATENT_FACTOR)
            if resized
            else shape
        )
        subnoise = cpu_randn(plan.subseed, noise_shape) if plan.subseed_strength != 0 else None
        if noise_shape != shape:
            noise = cpu_randn(plan.seed, noise_shape)
        else:
            noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        if subnoise is not None:
            noise = slerp(plan.subseed_strength, noise, subnoise)
        if noise_shape != shape:
            noise = _paste_centred(torch.randn(shape, generator=self.generator, dtype=torch.float32), noise)
        if plan.eta_noise_seed_delta:
            self.generator = torch.Generator("cpu").manual_seed(int(plan.seed) + plan.eta_noise_seed_delta)
        return noise

    def step_generator(self) -> torch.Generator:
        """The generator the sampler's per-step noise comes from (after :meth:`initial`)."""
        return self.generator


def _paste_centred(target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Centre the noise drawn at the "seed resize from" size inside noise of the real size."""
    dx = (target.shape[2] - noise.shape[2]) // 2
    dy = (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return target
