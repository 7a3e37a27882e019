"""What a training takes and gives back: its images, one report per step and the result."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class TrainingSample:
    """One dataset image and its caption (the WebUI's ``[filewords]``; "" when the image has none)."""

    image: Image.Image
    caption: str = ""


@dataclass(frozen=True)
class StepReport:
    step: int  # steps done so far (1-based)
    steps: int
    loss: float  # this step's loss: the mean over its gradient_step micro-batches
    learn_rate: float


@dataclass(frozen=True)
class TrainResult:
    file_bytes: bytes  # the output file in the WebUI's format (.safetensors embedding or .pt hypernetwork)
    losses: list[float]  # one per step, those before a resume included (restored from the checkpoint)
    probe_loss_before: float | None  # the fixed probe batch's loss with the initial weights (None: 0 steps)
    probe_loss_after: float | None  # the same probe with the trained weights
