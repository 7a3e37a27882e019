"""The loop both kinds share: the WebUI's training step, checkpoints, previews and the probe.

One step (0-based ``s``): the learning rate ``rate_at(schedule, s)``; ``gradient_step`` micro-batches of
``batch_size`` images, each's loss divided by ``gradient_step`` and back-propagated (so the step's loss is
their mean); the gradients clipped by value or norm when ``clip_grad_mode`` says so; one optimizer step.
Everything random in it comes from (seed, s) (:mod:`worker.engine.training.seeding`), so a run resumed from
the checkpoint of step k repeats the uninterrupted run's steps k+1.. exactly (bit for bit on the CPU).

After a step, in this order: the checkpoint when ``save_every`` divides the steps done (not at the last step:
the result is that), ``on_step`` (which may raise to stop the training: the exception propagates at once),
and the preview when ``create_image_every`` divides them.

The pipeline is a worker's warm, shared one: its weights are only read. For the training's duration every
parameter of its UNet, text encoder and VAE has ``requires_grad`` off (so no gradient lands on them) and every
module is in eval mode; afterwards each flag is as it was, and no hook or wrapper is left (``finally``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from shared.jobs.training_spec import TrainSpec, rate_at
from worker.engine.conditioning import strip_extra_networks
from worker.engine.training import seeding
from worker.engine.training.checkpoint import Checkpoint
from worker.engine.training.data import MicroBatch, training_data
from worker.engine.training.diffusion import Precision, alphas_cumprod, euler_preview, noise_loss
from worker.engine.training.results import StepReport, TrainingSample, TrainResult

StepCallback = Callable[[StepReport], None]
CheckpointCallback = Callable[[int, bytes], None]
PreviewCallback = Callable[[int, Image.Image, str], None]


class Trainee(Protocol):
    """What one kind of training trains, and how it enters the model. Optional, looked up by name: ``observe(data)``
    (shown the dataset once it is encoded) and ``learning_rates(step, rate)`` (each optimizer parameter group's own
    rate; without it every group takes the schedule's ``rate``)."""

    placeholder: str  # what a template's [name] becomes

    def parameters(self) -> list[torch.Tensor]: ...
    def make_optimizer(self) -> torch.optim.Optimizer: ...
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
    def applied(self) -> contextlib.AbstractContextManager[None]: ...
    def set_training(self, on: bool) -> None: ...
    def conditioning(self, prompts: list[str]) -> torch.Tensor: ...
    def output(self, step: int) -> bytes: ...


@contextlib.contextmanager
def borrowed(pipeline: Any) -> Iterator[None]:
    """The pipeline's models frozen and in eval mode for the block; every flag as it was afterwards."""
    models = [model for model in (pipeline.unet, pipeline.text_encoder, pipeline.vae) if model is not None]
    grads = [(p, p.requires_grad) for model in models for p in model.parameters()]
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for parameter, _ in grads:
            parameter.requires_grad_(False)
        for model in models:
            model.eval()
        yield
    finally:
        for parameter, flag in grads:
            parameter.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


def _clip(parameters: list[torch.Tensor], mode: str, value: float) -> None:
    if mode == "value":
        torch.nn.utils.clip_grad_value_(parameters, value)
    elif mode == "norm":
        torch.nn.utils.clip_grad_norm_(parameters, value)


class Loop:
    def __init__(self, pipeline: Any, spec: TrainSpec, samples: Sequence[TrainingSample], trainee: Trainee) -> None:
        self.pipeline, self.spec, self.trainee = pipeline, spec, trainee
        self.unet = pipeline.unet
        self.precision = Precision(self.unet)
        self.alphas_cpu = alphas_cumprod(pipeline.scheduler)
        self.alphas = self.alphas_cpu.to(self.precision.device, torch.float32)
        self.data = training_data(pipeline.vae, spec, samples, trainee.placeholder, int(self.alphas_cpu.shape[0]))
        observe = getattr(trainee, "observe", None)  # a trainee that records the dataset (a LoRA's metadata)
        if observe is not None:
            observe(self.data)
        self.optimizer = trainee.make_optimizer()

    def rates(self, step: int, rate: float) -> list[float]:
        """Each optimizer parameter group's learning rate at ``step``: ``rate`` (the schedule's) for every group,
        unless the trainee sets its groups' own (``learning_rates``: a LoRA's UNet and text-encoder rates)."""
        per_group = getattr(self.trainee, "learning_rates", None)
        if per_group is None:
            return [rate] * len(self.optimizer.param_groups)
        return [float(r) for r in per_group(step, rate)]

    def step(self, step: int, batches: list[MicroBatch], rate: float) -> float:
        """One optimizer step over ``batches``; the mean of their losses."""
        for group, group_rate in zip(self.optimizer.param_groups, self.rates(step, rate), strict=True):
            group["lr"] = group_rate
        scaler, total = self.precision.scaler, 0.0
        self.trainee.set_training(True)
        try:
            seed = seeding.derived_seed(self.spec.seed, seeding.DROPOUT, step)
            with seeding.seeded_global_rng(seed, self.precision.device):
                for batch in batches:
                    with self.precision.autocast():
                        cond = self.trainee.conditioning(batch.prompts)
                        loss = noise_loss(self.unet, self.alphas, batch, cond) / len(batches)
                    scaler.scale(loss).backward()
                    total += float(loss.detach())
            if self.spec.clip_grad_mode != "disabled":
                scaler.unscale_(self.optimizer)
                _clip(self.trainee.parameters(), self.spec.clip_grad_mode, self.spec.clip_grad_value)
            scaler.step(self.optimizer)
            scaler.update()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.trainee.set_training(False)
        return total

    @torch.no_grad()
    def probe_loss(self) -> float:
        """The mean loss over the fixed probe batch with the current weights (no dropout)."""
        total, count = 0.0, 0
        for batch in self.data.probe():
            with self.precision.autocast():
                loss = noise_loss(self.unet, self.alphas, batch, self.trainee.conditioning(batch.prompts))
            total += float(loss) * len(batch.prompts)
            count += len(batch.prompts)
        return total / count

    @torch.no_grad()
    def preview(self, prompt: str) -> Image.Image:
        spec = self.spec
        with self.precision.autocast():
            cond = self.trainee.conditioning([strip_extra_networks(prompt)])
            uncond = self.trainee.conditioning([""])
        if cond.shape[1] != uncond.shape[1]:  # a long prompt: the empty prompt padded with empty chunks
            uncond = uncond.repeat(1, cond.shape[1] // uncond.shape[1], 1)
        return euler_preview(self.unet, self.pipeline.vae, self.alphas_cpu, cond, uncond, spec.training_width,
                             spec.training_height, spec.preview_steps, spec.preview_cfg_scale,
                             seeding.generator(spec.seed, seeding.PREVIEW), self.precision)

    def checkpoint(self, step: int, losses: list[float], probe_before: float) -> Checkpoint:
        return Checkpoint(self.spec.kind, self.spec.seed, step, self.trainee.tensors(), self.optimizer.state_dict(),
                          self.precision.scaler.state_dict(), list(losses), probe_before)

    def resume(self, data: bytes) -> Checkpoint:
        saved = Checkpoint.from_bytes(data, self.spec.kind, self.spec.seed)
        self.trainee.load_tensors(saved.tensors)
        self.optimizer.load_state_dict(saved.optimizer)
        self.precision.scaler.load_state_dict(saved.scaler)
        return saved


def run(pipeline: Any, spec: TrainSpec, samples: Sequence[TrainingSample], make: Callable[[Any, TrainSpec], Trainee],
        resume: bytes | None, on_step: StepCallback, on_checkpoint: CheckpointCallback,
        on_preview: PreviewCallback | None, initial: bytes | None = None) -> TrainResult:
    """Train what ``make`` builds on ``pipeline``; see the module's docstring for the order of the callbacks.
    ``initial``: the file ``spec.start_from`` names, whose tensors (and shape or structure) the training starts
    from. With ``spec.steps`` 0 nothing is trained: the file is made as the WebUI's "create" makes it."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError("training needs an SD1.x checkpoint (this one is SDXL)")
    start_tensors = None
    if initial is not None:
        from worker.engine.training.initial import initial_state

        spec, start_tensors = initial_state(spec, initial)
    with borrowed(pipeline):
        trainee = make(pipeline, spec)
        if start_tensors is not None:
            trainee.load_tensors(start_tensors)
        if spec.steps == 0:
            return TrainResult(trainee.output(0), [], None, None)
        loop = Loop(pipeline, spec, samples, trainee)
        schedule = spec.learn_rate_schedule
        with trainee.applied():
            if resume is not None:
                saved = loop.resume(resume)
                start, losses, probe_before = saved.step, list(saved.losses), saved.probe_loss_before
            else:
                start, losses, probe_before = 0, [], loop.probe_loss()
            for step in range(start, spec.steps):
                rate = rate_at(schedule, step)
                batches = loop.data.draw(step)
                losses.append(loop.step(step, batches, rate))
                done = step + 1
                if spec.save_every and done % spec.save_every == 0 and done < spec.steps:
                    on_checkpoint(done, loop.checkpoint(done, losses, probe_before).to_bytes())
                on_step(StepReport(done, spec.steps, losses[-1], loop.rates(step, rate)[0]))
                if on_preview is not None and spec.create_image_every and done % spec.create_image_every == 0:
                    prompt = spec.preview_prompt or batches[0].prompts[0]
                    on_preview(done, loop.preview(prompt), prompt)
            probe_after = loop.probe_loss()
            return TrainResult(trainee.output(len(losses)), losses, probe_before, probe_after)
