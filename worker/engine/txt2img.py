"""txt2img with the WebUI's seed rule: image k of a job uses seed + k, with its own generator.

Initial noise is drawn on the CPU so a seed means the same image on any hardware.
The step callback only records progress and checks for cancellation; everything else
(PNG encoding, uploads, row writes) happens after the denoising loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from worker.engine.scheduling import build_scheduler

StepCallback = Callable[[int, int], None]


@dataclass
class RenderedImage:
    index: int
    seed: int
    image: Image.Image


def initial_latents(pipe: Any, seeds: list[int], width: int, height: int) -> torch.Tensor:
    channels = pipe.unet.config.in_channels
    shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(noise).to(device=pipe.device, dtype=pipe.unet.dtype)


def render_txt2img(
    pipe: Any, params: dict[str, Any], scheduler_config: Any, on_step: StepCallback | None = None
) -> list[RenderedImage]:
    """Render every image of a job; `scheduler_config` is the checkpoint's own, untouched by earlier jobs."""
    pipe.scheduler = build_scheduler(scheduler_config, params["sampler_name"], params["scheduler"])
    batch, n_iter, steps = int(params["batch_size"]), int(params["n_iter"]), int(params["steps"])
    total_steps = steps * n_iter
    results: list[RenderedImage] = []
    for iteration in range(n_iter):
        first = iteration * batch
        seeds = [int(params["seed"]) + first + i for i in range(batch)]

        def callback(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any], _it: int = iteration) -> dict:
            if on_step is not None:
                on_step(_it * steps + step + 1, total_steps)
            return {}

        output = pipe(
            prompt=[params["prompt"]] * batch,
            negative_prompt=[params["negative_prompt"]] * batch,
            num_inference_steps=steps,
            guidance_scale=float(params["cfg_scale"]),
            width=int(params["width"]),
            height=int(params["height"]),
            latents=initial_latents(pipe, seeds, int(params["width"]), int(params["height"])),
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="pil",
            callback_on_step_end=callback,
        )
        results.extend(RenderedImage(first + i, seeds[i], img) for i, img in enumerate(output.images))
    return results
