"""The dataset as the WebUI's ``PersonalizedBase`` prepares it, and each step's draw from it.

Images are converted to RGB, resized to training_width x training_height (bicubic) and encoded by the VAE
once (the WebUI's latent sampling method "once": one sample of each image's latent distribution, drawn here
with a generator seeded from the training's seed and the image's index, times the VAE's scaling factor).

A training prompt is a random line of the template with ``[filewords]`` replaced by the caption's
comma-separated tags (each dropped with probability tag_drop_out, then shuffled when shuffle_tags is on, and
joined with "," as the WebUI joins them) and ``[name]`` by the placeholder (the embedding's or the
hypernetwork's name). Unlike the WebUI, which picks an image's template line once when neither option is
on, every step draws its own lines, so that a step depends on nothing but (seed, step).

Each step takes ``batch_size x gradient_step`` distinct images in a random order (the WebUI's shuffled
loader; both numbers are capped by the dataset's size as the WebUI caps them), then per micro-batch its
prompts, timesteps (uniform over the scheduler's training timesteps) and noise, all from the step's own
generator (:mod:`worker.engine.training.seeding`).

With ``enable_bucket`` (LoRAs) the images are in aspect-ratio buckets instead, each micro-batch from one bucket:
:mod:`worker.engine.training.buckets`, which :func:`training_data` picks.
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
from worker.engine.training.results import TrainingSample

PROBE_ITEMS = 8  # images (cycled or spread over the dataset) in the fixed probe batch


@dataclass(frozen=True)
class MicroBatch:
    latents: torch.Tensor  # [b, C, H/8, W/8] float32, on the device
    prompts: list[str]
    timesteps: torch.Tensor  # [b] int64, on the device
    noise: torch.Tensor  # [b, C, H/8, W/8] float32, on the device


def training_prompt(line: str, caption: str, placeholder: str, tag_drop_out: float, shuffle_tags: bool,
                    generator: torch.Generator) -> str:
    """One template line filled in as the WebUI's ``create_text`` fills it (its draws from ``generator``)."""
    tags = caption.split(",")
    if tag_drop_out:
        keep = torch.rand(len(tags), generator=generator, dtype=torch.float64).tolist()
        tags = [tag for tag, draw in zip(tags, keep, strict=True) if draw > tag_drop_out]
    if shuffle_tags and len(tags) > 1:
        tags = [tags[i] for i in torch.randperm(len(tags), generator=generator).tolist()]
    return line.replace("[filewords]", ",".join(tags)).replace("[name]", placeholder)


def pixel_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """``[3, height, width]`` in [-1, 1], resized as the WebUI resizes training images."""
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.uint8).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_latents(vae: Any, samples: Sequence[TrainingSample], width: int, height: int, seed: int) -> torch.Tensor:
    """Every image's latent, sampled once from the VAE's distribution: ``[n, C, H/8, W/8]`` float32."""
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    latents = []
    for index, sample in enumerate(samples):
        pixels = pixel_tensor(sample.image, width, height).unsqueeze(0).to(vae.device, vae.dtype)
        distribution = vae.encode(pixels).latent_dist
        latent = distribution.sample(generator=seeding.generator(seed, seeding.LATENT, index))
        latents.append(latent.float() * scale)
    return torch.cat(latents)


class TrainingData:
    """The encoded dataset and the draws of each step and of the probe."""

    def __init__(self, vae: Any, spec: TrainSpec, samples: Sequence[TrainingSample], placeholder: str,
                 timesteps: int) -> None:
        self._setup(spec, samples, placeholder, timesteps)
        self.latents = encode_latents(vae, samples, spec.training_width, spec.training_height, spec.seed)

    def _setup(self, spec: TrainSpec, samples: Sequence[TrainingSample], placeholder: str, timesteps: int) -> None:
        """The checks and the draws' sizes every dataset shares (:mod:`.buckets` encodes its images its own way)."""
        if not samples:
            raise ValueError("the dataset holds no images")
        if not spec.template:
            raise ValueError("the template has no lines")
        if spec.training_width % LATENT_FACTOR or spec.training_height % LATENT_FACTOR:
            raise ValueError(f"training_width and training_height must be multiples of {LATENT_FACTOR}")
        self.spec = spec
        self.captions = [sample.caption for sample in samples]
        self.placeholder = placeholder
        self.timesteps = timesteps
        count = len(samples)
        # As the WebUI's dataset: both capped so that a step never takes an image twice.
        self.batch_size = min(spec.batch_size, count)
        self.gradient_step = min(spec.gradient_step, count // self.batch_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (LATENT_CHANNELS, self.spec.training_height // LATENT_FACTOR, self.spec.training_width // LATENT_FACTOR)

    def draw(self, step: int) -> list[MicroBatch]:
        """Step ``step``'s (0-based) micro-batches; the same for a step whatever ran before it."""
        generator = seeding.generator(self.spec.seed, seeding.STEP, step)
        order = torch.randperm(len(self.captions), generator=generator).tolist()
        batches = []
        for j in range(self.gradient_step):
            indices = order[j * self.batch_size : (j + 1) * self.batch_size]
            prompts, timesteps = self.draw_prompts_and_timesteps(indices, generator)
            noise = torch.randn((len(indices), *self.latent_shape), generator=generator)
            batches.append(self._batch(indices, prompts, timesteps, noise))
        return batches

    def draw_prompts_and_timesteps(self, indices: list[int], generator: torch.Generator
                                   ) -> tuple[list[str], torch.Tensor]:
        """A micro-batch's draws before its noise: each image's template line (tags dropped and shuffled as the
        spec says), then the timesteps; every subclass draws them in this order from the step's generator."""
        spec, prompts = self.spec, []
        for index in indices:
            line = spec.template[int(torch.randint(len(spec.template), (1,), generator=generator))]
            prompts.append(training_prompt(line, self.captions[index], self.placeholder, spec.tag_drop_out,
                                           spec.shuffle_tags, generator))
        return prompts, torch.randint(0, self.timesteps, (len(indices),), generator=generator)

    def probe_plan(self, generator: torch.Generator) -> tuple[list[int], list[str], torch.Tensor]:
        """The probe's images, prompts and timesteps (its noise is drawn next, from the same generator)."""
        count = len(self.captions)
        indices = [(i * count) // PROBE_ITEMS for i in range(PROBE_ITEMS)]
        prompts = [self.spec.template[0].replace("[filewords]", self.captions[i]).replace("[name]", self.placeholder)
                   for i in indices]
        offsets = torch.rand(PROBE_ITEMS, generator=generator, dtype=torch.float64)
        timesteps = ((torch.arange(PROBE_ITEMS) + offsets) * self.timesteps / PROBE_ITEMS).long()
        return indices, prompts, timesteps.clamp(0, self.timesteps - 1)

    def probe(self) -> list[MicroBatch]:
        """The fixed probe: :data:`PROBE_ITEMS` images spread over the dataset, each with the template's first
        line and its whole caption, timesteps stratified over the schedule, noise from the probe's generator."""
        generator = seeding.generator(self.spec.seed, seeding.PROBE)
        indices, prompts, timesteps = self.probe_plan(generator)
        noise = torch.randn((PROBE_ITEMS, *self.latent_shape), generator=generator)
        size = self.batch_size
        return [self._batch(indices[i : i + size], prompts[i : i + size], timesteps[i : i + size],
                            noise[i : i + size]) for i in range(0, PROBE_ITEMS, size)]

    def _batch(self, indices: list[int], prompts: list[str], timesteps: torch.Tensor,
               noise: torch.Tensor) -> MicroBatch:
        device = self.latents.device
        return MicroBatch(self.latents[indices], prompts, timesteps.to(device), noise.to(device))


def training_data(vae: Any, spec: TrainSpec, samples: Sequence[TrainingSample], placeholder: str,
                  timesteps: int) -> TrainingData:
    """The dataset a training draws from: in aspect-ratio buckets with ``enable_bucket`` (:mod:`.buckets`),
    else every image at training_width x training_height."""
    if spec.enable_bucket:
        from worker.engine.training.buckets import BucketedData

        return BucketedData(vae, spec, samples, placeholder, timesteps)
    return TrainingData(vae, spec, samples, placeholder, timesteps)
