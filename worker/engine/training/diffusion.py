"""The diffusion pieces a training needs: the noise-prediction loss, mixed precision and a preview sampler.

The loss is the WebUI's (``LatentDiffusion.p_losses`` with its defaults): the MSE between the UNet's
predicted noise and the noise added at a timestep drawn uniformly, the noisy latent being
``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` with the pipeline scheduler's ``alphas_cumprod``. The scheduler object
is only read (its own ``add_noise`` moves its tensors to the latents' device, which would change an object
every render shares).

Half-precision UNets (fp16 on a GPU) train as the WebUI trains them: the trained weights stay float32, the
forward pass runs under autocast and the loss is scaled (``GradScaler``) so that small gradients survive
fp16; float32 pipelines (the CPU) need neither.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine.training.data import MicroBatch

HALF = (torch.float16, torch.bfloat16)


def alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """The scheduler's cumulative alphas as a float64 CPU copy (the scheduler itself is left as it is)."""
    config = scheduler.config
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"training needs an epsilon-prediction model (this one predicts {config['prediction_type']})")
    existing = getattr(scheduler, "alphas_cumprod", None)
    if existing is not None:
        return torch.as_tensor(existing).detach().to("cpu", torch.float64).clone()
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    if config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def noise_loss(unet: Any, alphas: torch.Tensor, batch: MicroBatch, cond: torch.Tensor) -> torch.Tensor:
    """The mean squared error of the UNet's noise prediction for one micro-batch (float32 scalar)."""
    alpha = alphas[batch.timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * batch.latents + (1.0 - alpha).sqrt() * batch.noise
    predicted = unet(noisy.to(unet.dtype), batch.timesteps, encoder_hidden_states=cond.to(unet.dtype)).sample
    return F.mse_loss(predicted.float(), batch.noise)


class Precision:
    """Autocast and loss scaling for a half-precision UNet; pass-throughs for a float32 one."""

    def __init__(self, unet: Any) -> None:
        self.device = torch.device(unet.device)
        self.dtype = unet.dtype
        self.half = self.dtype in HALF
        scaled = self.dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaled)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.half:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _sigma_at(log_sigmas: torch.Tensor, t: float) -> float:
    low = math.floor(t)
    high = min(low + 1, log_sigmas.shape[0] - 1)
    weight = t - low
    return math.exp((1 - weight) * float(log_sigmas[low]) + weight * float(log_sigmas[high]))


@torch.no_grad()
def euler_preview(unet: Any, vae: Any, alphas: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  width: int, height: int, steps: int, cfg_scale: float, generator: torch.Generator,
                  precision: Precision) -> Image.Image:
    """One image by the Euler sampler (k-diffusion's, on the model's own sigmas at evenly spaced timesteps) with
    classifier-free guidance; ``cond`` and ``uncond`` are ``[1, tokens, width]`` of the same length."""
    log_sigmas = ((1 - alphas) / alphas).sqrt().log()
    top = alphas.shape[0] - 1
    times = [top * (1 - i / max(steps - 1, 1)) for i in range(steps)] if steps > 1 else [float(top)]
    sigmas = [_sigma_at(log_sigmas, t) for t in times] + [0.0]
    shape = (1, int(unet.config.in_channels), height // 8, width // 8)
    x = torch.randn(shape, generator=generator).to(precision.device) * sigmas[0]
    context = torch.cat([uncond, cond]).to(unet.dtype)
    for i, t in enumerate(times):
        sigma = sigmas[i]
        scaled = (x / math.sqrt(sigma**2 + 1)).to(unet.dtype)
        timestep = torch.full((2,), t, device=precision.device)
        with precision.autocast():
            eps = unet(torch.cat([scaled, scaled]), timestep, encoder_hidden_states=context).sample.float()
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        x = x + eps * (sigmas[i + 1] - sigma)  # d = (x - denoised) / sigma = eps
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    decoded = vae.decode((x / scale).to(vae.dtype)).sample.float()
    array = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")
