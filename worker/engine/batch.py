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
