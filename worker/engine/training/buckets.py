"""Aspect-ratio buckets as kohya's sd-scripts make them (``enable_bucket``), and the dataset drawn by bucket.

The buckets: every (width, height) in steps of ``bucket_reso_steps`` between ``min_bucket_reso`` and
``max_bucket_reso`` whose area is at most training_width x training_height, as kohya's
``make_bucket_resolutions`` lists them (for each width from the minimum up, the largest height in steps that
keeps the area, both orientations, plus the square of that area). Each image goes to the bucket whose aspect
ratio is nearest its own (kohya's ``BucketManager.select_bucket`` without ``bucket_no_upscale``): it is
resized (bicubic, as the farm's other training images) so that it covers the bucket, then cropped to it
around the centre (kohya's default, no random crop), and encoded by the VAE at that size.

A step takes its images as :class:`~worker.engine.training.data.TrainingData` does (a random order of the
dataset from the step's generator), but each micro-batch holds images of one bucket only: it starts with the
first image not yet taken and fills up with the next ones of the same bucket, so it may be smaller than
``batch_size`` when the bucket is (as kohya's last batch of a bucket is). Prompts, timesteps and noise are then
drawn as without buckets, the noise in the bucket's latent shape. The probe takes the same images as without
buckets, grouped by bucket.

``bucket_reso_steps`` must be a multiple of 8 (a whole latent), as training_width and training_height must; kohya
asks 64 of SD1.x trainings (a size the UNet's three downsamplings divide), which the diffusers UNet does not need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.jobs.training_spec import TrainSpec
from worker.engine.noise import LATENT_CHANNELS, LATENT_FACTOR
from worker.engine.training import seeding
from worker.engine.training.data import MicroBatch, TrainingData
from worker.engine.training.results import TrainingSample

Resolution = tuple[int, int]  # (width, height) in pixels


def bucket_resolutions(width: int, height: int, min_reso: int, max_reso: int, steps: int) -> list[Resolution]:
    """kohya's ``make_bucket_resolutions((width, height), min_reso, max_reso, steps)``, sorted."""
    area = width * height
    side = int(area**0.5 // steps) * steps
    resos = {(side, side)}
    w = min_reso
    while w <= max_reso:
        h = min(max_reso, int((area // w) // steps) * steps)
        if h >= min_reso:
            resos.add((w, h))
            resos.add((h, w))
        w += steps
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    bucket: Resolution  # (width, height) the image is trained at
    resized: Resolution  # the size it is resized to before the centre crop (covers the bucket)
    ar_error: float  # the bucket's aspect ratio minus the image's


def select_bucket(resos: Sequence[Resolution], image_width: int, image_height: int) -> Placement:
    """kohya's ``select_bucket`` (with upscaling): the bucket of the nearest aspect ratio, an exact size first."""
    ratio = image_width / image_height
    if (image_width, image_height) in resos:
        reso = (image_width, image_height)
    else:
        errors = np.abs(np.array([w / h for w, h in resos]) - ratio)
        reso = resos[int(errors.argmin())]
    if ratio > reso[0] / reso[1]:  # wider than the bucket: match the height
        scale = reso[1] / image_height
    else:
        scale = reso[0] / image_width
    resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
    return Placement(reso, resized, reso[0] / reso[1] - ratio)


def bucket_pixels(image: Image.Image, placement: Placement) -> torch.Tensor:
    """``[3, height, width]`` in [-1, 1] at the bucket's size: resized to cover it, cropped around the centre."""
    width, height = placement.bucket
    resized = image.convert("RGB").resize(placement.resized, Image.Resampling.BICUBIC)
    left, top = (placement.resized[0] - width) // 2, (placement.resized[1] - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    array = np.asarray(cropped, dtype=np.uint8).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class BucketedData(TrainingData):
    """The dataset in aspect-ratio buckets: each image's latent at its bucket's size, micro-batches by bucket."""

    def __init__(self, vae: Any, spec: TrainSpec, samples: Sequence[TrainingSample], placeholder: str,
                 timesteps: int) -> None:
        self._setup(spec, samples, placeholder, timesteps)
        steps = spec.bucket_reso_steps
        if steps % LATENT_FACTOR:
            raise ValueError(f"bucket_reso_steps {steps} must be a multiple of {LATENT_FACTOR}")
        if spec.min_bucket_reso > spec.max_bucket_reso:
            raise ValueError(f"min_bucket_reso {spec.min_bucket_reso} is above max_bucket_reso {spec.max_bucket_reso}")
        if spec.max_bucket_reso < max(spec.training_width, spec.training_height):
            raise ValueError(f"max_bucket_reso {spec.max_bucket_reso} must be at least training_width and "
                             f"training_height (as kohya's bucketing requires)")
        self.resolutions = bucket_resolutions(spec.training_width, spec.training_height, spec.min_bucket_reso,
                                              spec.max_bucket_reso, steps)
        self.placements = [select_bucket(self.resolutions, *sample.image.size) for sample in samples]
        self.buckets = [placement.bucket for placement in self.placements]
        scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.images: list[torch.Tensor] = []  # each [C, h, w] float32 on the VAE's device
        with torch.no_grad():
            for index, (sample, placement) in enumerate(zip(samples, self.placements, strict=True)):
                pixels = bucket_pixels(sample.image, placement).unsqueeze(0).to(vae.device, vae.dtype)
                distribution = vae.encode(pixels).latent_dist
                latent = distribution.sample(generator=seeding.generator(spec.seed, seeding.LATENT, index))
                self.images.append(latent[0].float() * scale)

    def shape_of(self, index: int) -> tuple[int, int, int]:
        width, height = self.buckets[index]
        return (LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR)

    def bucket_info(self) -> dict[str, Any]:
        """kohya's ``bucket_info`` (the ``ss_bucket_info`` metadata): the buckets in use, sorted, with their
        image counts, and the mean absolute aspect-ratio error."""
        used = sorted(set(self.buckets))
        return {"buckets": {i: {"resolution": list(reso), "count": self.buckets.count(reso)}
                            for i, reso in enumerate(used)},
                "mean_img_ar_error": float(np.mean([abs(p.ar_error) for p in self.placements]))}

    def draw(self, step: int) -> list[MicroBatch]:
        generator = seeding.generator(self.spec.seed, seeding.STEP, step)
        remaining = torch.randperm(len(self.captions), generator=generator).tolist()
        batches = []
        for _ in range(self.gradient_step):
            bucket = self.buckets[remaining[0]]
            indices = [i for i in remaining if self.buckets[i] == bucket][: self.batch_size]
            remaining = [i for i in remaining if i not in indices]
            prompts, timesteps = self.draw_prompts_and_timesteps(indices, generator)
            noise = torch.randn((len(indices), *self.shape_of(indices[0])), generator=generator)
            batches.append(self._bucket_batch(indices, prompts, timesteps, noise))
        return batches

    def probe(self) -> list[MicroBatch]:
        generator = seeding.generator(self.spec.seed, seeding.PROBE)
        indices, prompts, timesteps = self.probe_plan(generator)
        noise = [torch.randn(self.shape_of(i), generator=generator) for i in indices]
        batches = []
        for bucket in sorted({self.buckets[i] for i in indices}):
            items = [j for j, i in enumerate(indices) if self.buckets[i] == bucket]
            for start in range(0, len(items), self.batch_size):
                part = items[start : start + self.batch_size]
                batches.append(self._bucket_batch([indices[j] for j in part], [prompts[j] for j in part],
                                                  timesteps[part], torch.stack([noise[j] for j in part])))
        return batches

    def _bucket_batch(self, indices: list[int], prompts: list[str], timesteps: torch.Tensor,
                      noise: torch.Tensor) -> MicroBatch:
        latents = torch.stack([self.images[i] for i in indices])
        device = latents.device
        return MicroBatch(latents, prompts, timesteps.to(device), noise.to(device))
