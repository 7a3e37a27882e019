"""A training's resume point: plain data that ``torch.load(..., weights_only=True)`` reads back.

``torch.save`` of a dict holding only tensors (on the CPU), numbers, strings, lists, tuples and dicts: the
steps done, the trained tensors by name, the optimizer's and the loss scaler's state dicts, the losses so far
and the probe loss of the initial weights. Nothing in it is an object to unpickle, so a checkpoint from the
object store is read with the weights-only unpickler like every other file the worker opens.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

VERSION = 1


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


@dataclass(frozen=True)
class Checkpoint:
    kind: str
    seed: int
    step: int  # steps done
    tensors: dict[str, torch.Tensor]  # the trained tensors by name
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    losses: list[float]
    probe_loss_before: float

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"version": VERSION, "kind": self.kind, "seed": self.seed, "step": self.step,
                    "tensors": _to_cpu(self.tensors), "optimizer": _to_cpu(self.optimizer),
                    "scaler": _to_cpu(self.scaler), "losses": [float(x) for x in self.losses],
                    "probe_loss_before": float(self.probe_loss_before)}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, kind: str, seed: int) -> Checkpoint:
        """Read a checkpoint of this training; a ValueError says why it is not one."""
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler's refusal, a truncated file
            raise ValueError(f"the checkpoint cannot be read: {type(exc).__name__}: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != VERSION:
            raise ValueError("not a training checkpoint of this version")
        if state.get("kind") != kind or state.get("seed") != seed:
            raise ValueError(f"the checkpoint is of another training ({state.get('kind')}, seed {state.get('seed')})")
        losses = [float(x) for x in state["losses"]]
        step = int(state["step"])
        if len(losses) != step:
            raise ValueError(f"the checkpoint at step {step} holds {len(losses)} losses")
        return cls(kind, seed, step, dict(state["tensors"]), dict(state["optimizer"]), dict(state["scaler"]),
                   losses, float(state["probe_loss_before"]))
