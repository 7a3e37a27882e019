"""What a batch of jobs is to the engine: the jobs, the limits of one UNet call, and per-job outcomes.

A batch is the jobs one claim took together (docs/architecture.md; ``shared.jobs.lifecycle.claim_batch``):
they share a batch key, so one model, size, sampler and step plan. The engine denoises their images
together, in UNet calls of at most ``BatchLimits.max_images`` images and ``max_pixels`` pixels, and reports
each job on its own: its images, or the exception that ended it (a user error found late, a cancel, its
time limit). A job whose step callback raises is dropped from the batch at that step; the rest go on.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from shared.jobs.contract import RenderSpec

# (job, evaluations done, evaluations in all) after each model evaluation of the job's images; it may
# raise to take the job out of the batch (cancel, time limit): the exception becomes the job's outcome.
JobStep = Callable[[uuid.UUID, int, int], None]


@dataclass(frozen=True)
class BatchJob:
    job_id: uuid.UUID
    spec: RenderSpec


@dataclass(frozen=True)
class BatchLimits:
    """How much one UNet call may take: images, and pixels (images x width x height) so large images
    do not run out of memory. ``invariant``: one image per call (the `batch_invariant` mode)."""

    max_images: int = 8
    max_pixels: int = 8 * 512 * 512
    invariant: bool = False

    def images_per_call(self, width: int, height: int) -> int:
        if self.invariant:
            return 1
        return max(1, min(self.max_images, self.max_pixels // max(1, width * height)))


# Rough activation memory of one image in a UNet call (its cond and uncond rows), per latent-space pixel
# of output (fp16, SDPA attention): ~0.8 GB for a 512x512 SD1.5 image. Only a starting point: a CUDA
# out-of-memory error halves the batch and lowers the worker's limit.
_BYTES_PER_PIXEL = 3072
CPU_MAX_IMAGES = 8
CUDA_MAX_IMAGES = 16


def device_batch_limits(device: str, max_images: int = 0, pixel_budget: int = 0) -> BatchLimits:
    """The worker's limits: what the settings name, the rest fitted to the device (free memory on CUDA,
    a fixed small batch on the CPU, where memory is plenty and a batch of 8 is already past the gain)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        auto_pixels = max(512 * 512, int(free * 0.5) // _BYTES_PER_PIXEL)
        auto_images = CUDA_MAX_IMAGES
    else:
        auto_pixels, auto_images = CPU_MAX_IMAGES * 512 * 512, CPU_MAX_IMAGES
    return BatchLimits(max_images=max_images or auto_images, max_pixels=pixel_budget or auto_pixels)
