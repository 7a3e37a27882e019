"""A training that goes on from an existing file (``start_from``; the WebUI's train/embedding names one): the
file's tensors, and its shape or structure in place of the request's (the WebUI trains a file as it was made)."""

from __future__ import annotations

import io
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from shared.jobs.training_spec import TrainSpec
from worker.engine.training.embedding import TENSOR

_OLD_KEYS = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
             "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}


def initial_state(spec: TrainSpec, data: bytes) -> tuple[TrainSpec, dict[str, torch.Tensor]]:
    """The spec as the file shapes it, and the tensors to start from (a trainee's ``load_tensors`` keys).
    Raises ValueError when the file is not an embedding or hypernetwork of the WebUI's formats."""
    if spec.kind == "embedding":
        return _embedding(spec, data)
    return _hypernetwork(spec, data)


def _embedding(spec: TrainSpec, data: bytes) -> tuple[TrainSpec, dict[str, torch.Tensor]]:
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"{spec.start_from} is not a readable .safetensors embedding: {exc}") from exc
    vectors = tensors.get(TENSOR) if TENSOR in tensors else (next(iter(tensors.values())) if len(tensors) == 1
                                                              else None)
    if vectors is None:
        raise ValueError(f"{spec.start_from} holds {len(tensors)} tensors; expected one embedding tensor")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2:
        raise ValueError(f"{spec.start_from}: embedding tensor of shape {list(vectors.shape)}; expected [n, width]")
    return spec.model_copy(update={"nvpt": int(vectors.shape[0])}), {TENSOR: vectors.to(torch.float32)}


def _hypernetwork(spec: TrainSpec, data: bytes) -> tuple[TrainSpec, dict[str, torch.Tensor]]:
    try:
        state: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler's refusal, or not a torch file
        raise ValueError(f"{spec.start_from} cannot be read with the weights-only loader: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{spec.start_from} is not a WebUI hypernetwork (no dict of layers)")
    sizes = [key for key in state if isinstance(key, int)]
    if not sizes:
        raise ValueError(f"{spec.start_from} holds no layers")
    structure = tuple(float(x) for x in state.get("layer_structure") or (1, 2, 1))
    dropout = state.get("dropout_structure")
    update: dict[str, Any] = {
        "enable_sizes": tuple(sizes), "layer_structure": structure,
        "activation_func": str(state.get("activation_func") or "linear"),
        "add_layer_norm": bool(state.get("is_layer_norm", False)),
        "use_dropout": bool(state.get("use_dropout", False)),
        "dropout_structure": tuple(float(x) for x in dropout) if dropout else None,
    }
    if state.get("weight_initialization") in ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform",
                                              "KaimingNormal"):
        update["weight_init"] = state["weight_initialization"]
    tensors = {f"{size}.{j}.{_OLD_KEYS.get(key, key)}": value.to(torch.float32)
               for size in sizes for j, weights in enumerate(state[size][:2]) for key, value in dict(weights).items()}
    return spec.model_copy(update=update), tensors
