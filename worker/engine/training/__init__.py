"""Training embeddings and hypernetworks as the WebUI's Train tab does, and LoRAs as kohya's sd-scripts do
(issue 15).

``train(pipeline, spec, samples)`` trains what ``spec.kind`` names on a warm SD1.x pipeline without changing
it, and returns the output file in the WebUI's format with the losses and a probe of the model before and after.
Modules: :mod:`.data` (images, latents, prompts, each step's draw), :mod:`.seeding` (every draw from
(seed, step)), :mod:`.diffusion` (loss, mixed precision, the preview sampler), :mod:`.loop` (the shared loop),
:mod:`.embedding`, :mod:`.hypernetwork` and :mod:`.lora` (what each kind trains and saves; :mod:`.buckets`:
kohya's aspect-ratio buckets), :mod:`.checkpoint` (resume), :mod:`.initial` (going on from a file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from shared.jobs.training_spec import TrainSpec
from worker.engine.training.embedding import EmbeddingTrainee
from worker.engine.training.hypernetwork import HypernetworkTrainee
from worker.engine.training.loop import CheckpointCallback, PreviewCallback, StepCallback, Trainee, run
from worker.engine.training.lora import LoraTrainee
from worker.engine.training.results import StepReport, TrainingSample, TrainResult

__all__ = ["StepReport", "TrainResult", "TrainingSample", "train"]

TRAINEES: dict[str, Callable[[Any, TrainSpec], Trainee]] = {
    "embedding": EmbeddingTrainee,
    "hypernetwork": HypernetworkTrainee,
    "lora": LoraTrainee,
}


def _ignore_step(report: StepReport) -> None:
    pass


def _ignore_checkpoint(step: int, data: bytes) -> None:
    pass


def train(pipeline: Any, spec: TrainSpec, samples: Sequence[TrainingSample], *, resume: bytes | None = None,
          on_step: StepCallback = _ignore_step, on_checkpoint: CheckpointCallback = _ignore_checkpoint,
          on_preview: PreviewCallback | None = None, initial: bytes | None = None) -> TrainResult:
    """Train ``spec.kind`` ("embedding", "hypernetwork" or "lora") on ``samples``; ``resume`` continues from a
    checkpoint ``on_checkpoint`` gave; ``initial`` is the file ``spec.start_from`` names (training goes on from it).
    ``on_step`` may raise to stop: the exception propagates, the pipeline restored. A ValueError means the spec,
    the samples, the file or the checkpoint cannot be trained on this pipeline."""
    make = TRAINEES.get(spec.kind)
    if make is None:
        raise ValueError(f"unknown training kind {spec.kind!r}")
    return run(pipeline, spec, samples, make, resume, on_step, on_checkpoint, on_preview, initial)
