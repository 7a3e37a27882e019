"""What a worker does around a training (issue 15), beside the trainer itself (`worker/engine/training/`).

- :class:`TrainingProgress`: the job's own state as `jobs.training` shows it (step, loss, ETA, a thinned loss curve,
  the last checkpoint, previews), carried over from the previous attempt when a training resumes.
- :func:`load_samples`: the dataset's images and captions, read from the object store as the job recorded them.
- :func:`install_result`: the trained file into the shared model store (bytes by content, an entry under the
  kind's WebUI folder), so every worker and the API's lists have it at once, without a restart.

Object-store keys are deterministic per job (`trainings/<job id>/...`): a retry overwrites, nothing piles up.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session

from shared.jobs.training_spec import TrainSpec
from shared.models.store_files import add_file, delete_file
from shared.models.store_registry import NameTakenError, find_row
from shared.storage.base import ObjectStore
from shared.webui.image_metadata import encode_image
from shared.webui.infotext import format_infotext
from worker.engine.img2img import read_stored_image
from worker.engine.training.results import TrainingSample

log = logging.getLogger(__name__)
LOSS_POINTS = 300  # a training's loss curve in its view is thinned to about this many points


def checkpoint_key(job_id: uuid.UUID) -> str:
    return f"trainings/{job_id}/checkpoint.pt"


def preview_key(job_id: uuid.UUID, step: int) -> str:
    return f"trainings/{job_id}/preview-{step:07d}.png"


@dataclass
class TrainingProgress:
    """A training's state for `jobs.training`, built up step by step; ``as_dict`` is what is written."""

    steps: int
    step: int = 0
    loss: float | None = None
    learn_rate: float | None = None
    losses: list[list[float]] = field(default_factory=list)  # [step, loss], thinned
    checkpoint: dict[str, Any] | None = None
    previews: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    probe_loss: tuple[float, float] | None = None  # a fixed probe batch's loss before and after training
    started_step: int = 0
    _started: float = field(default_factory=time.monotonic)

    @classmethod
    def resumed(cls, steps: int, stored: dict[str, Any] | None) -> TrainingProgress:
        """The state a previous attempt left (its checkpoint, previews and curve up to the checkpoint's step)."""
        stored = stored or {}
        checkpoint = stored.get("checkpoint")
        at = int(checkpoint["step"]) if checkpoint else 0
        progress = cls(steps=steps, step=at, checkpoint=checkpoint, started_step=at,
                       previews=[p for p in stored.get("previews") or [] if int(p["step"]) <= at],
                       losses=[pair for pair in stored.get("losses") or [] if pair[0] <= at])
        return progress

    def record_step(self, step: int, loss: float, learn_rate: float) -> None:
        self.step, self.loss, self.learn_rate = step, loss, learn_rate
        self.losses.append([step, loss])
        if len(self.losses) > 2 * LOSS_POINTS:  # keep every other point, always the latest
            self.losses = [*self.losses[:-1:2], self.losses[-1]]

    def finish(self, losses: list[float], probe_before: float | None, probe_after: float | None) -> None:
        """The whole run's curve (a resumed run's included, from its checkpoint) and its probe, once done."""
        curve: list[list[float]] = [[step, loss] for step, loss in enumerate(losses, start=1)]
        while len(curve) > 2 * LOSS_POINTS:
            curve = [*curve[:-1:2], curve[-1]]
        self.losses = curve
        if probe_before is not None and probe_after is not None:
            self.probe_loss = (probe_before, probe_after)

    def eta_seconds(self) -> float | None:
        done = self.step - self.started_step
        if done <= 0:
            return None
        return round((time.monotonic() - self._started) / done * (self.steps - self.step), 1)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.steps) if self.steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "steps": self.steps, "loss": self.loss, "learn_rate": self.learn_rate,
                "eta_seconds": self.eta_seconds(), "losses": self.losses, "checkpoint": self.checkpoint,
                "previews": self.previews, "result": self.result,
                "probe_loss": list(self.probe_loss) if self.probe_loss else None}


def load_samples(spec: TrainSpec, load: Callable[[str], bytes]) -> list[TrainingSample]:
    """The dataset's images (RGB) and captions; a missing image fails the job naming it."""
    samples = []
    for index, item in enumerate(spec.items):
        image = read_stored_image(item.key, load, ("body", "dataset", index))
        samples.append(TrainingSample(image.convert("RGB"), item.caption))
    return samples


def install_result(session: Session, store: ObjectStore, spec: TrainSpec, job_id: uuid.UUID, owner: str,
                   data: bytes) -> dict[str, Any]:
    """Put the trained file into the model store under the kind's folder; returns the `result` the job shows.

    ``overwrite_old`` replaces an entry of that name. Without it, a name another file took while the training ran
    gets the job's id appended (the work is never lost): the result names where it went."""
    kind = spec.kind
    folder, name = spec.output_file.split("/", 1)
    suffix = Path(name).suffix
    with tempfile.TemporaryDirectory(prefix="renderfarm-training-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        existing = find_row(session, kind, name)
        if existing is not None and spec.overwrite_old:
            delete_file(session, store, existing)
        try:
            record, _ = add_file(session, store, path, kind, name, source="training", added_by=owner)
        except NameTakenError:
            session.rollback()
            name = f"{Path(name).stem}-{job_id.hex[:8]}{suffix}"
            log.warning("training %s: %s was taken meanwhile; installed as %s", job_id, spec.output_file, name)
            record, _ = add_file(session, store, path, kind, name, source="training", added_by=owner)
    stem = Path(record.name).stem
    used_as = {"embedding": stem, "hypernetwork": f"<hypernet:{stem}:1>", "lora": f"<lora:{stem}:1>"}[kind]
    return {"file": f"{folder}/{record.name}", "sha256": record.sha256, "size": record.size, "name": used_as}


def preview_png(image: Image.Image, prompt: str, step: int, spec: TrainSpec) -> bytes:
    """A preview as PNG with the WebUI's `parameters` text saying what made it (the sampler is the trainer's Euler;
    its noise comes from the training's own preview stream, so no seed is claimed)."""
    infotext = format_infotext(prompt, "", {
        "Steps": spec.preview_steps, "Sampler": "Euler", "CFG scale": spec.preview_cfg_scale,
        "Size": f"{image.width}x{image.height}", "Model hash": spec.model_hash, "Model": spec.model,
        "Training": f"{spec.kind} {spec.name} at step {step}"})
    return encode_image(image, infotext, "png")
