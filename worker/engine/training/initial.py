"""A training that goes on from an existing file (``start_from``; the WebUI's train/embedding names one): the
file's tensors, and its shape or structure in place of the request's (the WebUI trains a file as it was made).
A LoRA is a kohya file: its rank, alpha, which UNet layers it holds and whether it holds the text encoder's."""

from __future__ import annotations

import io
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from shared.jobs.training_spec import TrainSpec
from worker.engine.hypernetworks import OLD_KEYS
from worker.engine.training.embedding import TENSOR
from worker.engine.training.lora import ATTENTION_NAME, TEXT_ENCODER_PREFIX, UNET_PREFIX


def initial_state(spec: TrainSpec, data: bytes) -> tuple[TrainSpec, dict[str, torch.Tensor]]:
    """The spec as the file shapes it, and the tensors to start from (a trainee's ``load_tensors`` keys).
    Raises ValueError when the file is not an embedding or hypernetwork of the WebUI's formats, or a kohya LoRA."""
    if spec.kind == "embedding":
        return _embedding(spec, data)
    if spec.kind == "lora":
        return _lora(spec, data)
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
    tensors = {f"{size}.{j}.{OLD_KEYS.get(key, key)}": value.to(torch.float32)
               for size in sizes for j, weights in enumerate(state[size][:2]) for key, value in dict(weights).items()}
    return spec.model_copy(update=update), tensors


_LORA_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _lora(spec: TrainSpec, data: bytes) -> tuple[TrainSpec, dict[str, torch.Tensor]]:
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"{spec.start_from} is not a readable .safetensors LoRA: {exc}") from exc
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part = next((p for p in _LORA_PARTS if key.endswith(p)), None)
        if part is None or not key.startswith((f"{UNET_PREFIX}_", f"{TEXT_ENCODER_PREFIX}_")):
            raise ValueError(f"{spec.start_from} is not a kohya LoRA (networks.lora) of an SD1.x model: it holds "
                             f"{key!r}")
        modules.setdefault(key[: -len(part)], {})[part] = value
    if not modules:
        raise ValueError(f"{spec.start_from} holds no LoRA modules")
    ranks, alphas = set(), set()
    for name, parts in modules.items():
        down, up = parts.get(".lora_down.weight"), parts.get(".lora_up.weight")
        if down is None or up is None or down.dim() not in (2, 4) or down.shape[0] != up.shape[1]:
            raise ValueError(f"{spec.start_from}: module {name} lacks a matching lora_down and lora_up")
        ranks.add(int(down.shape[0]))
        alpha = parts.get(".alpha")
        alphas.add(float(alpha) if alpha is not None and float(alpha) != 0 else float(down.shape[0]))
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"{spec.start_from}: its modules have different ranks {sorted(ranks)} or alphas "
                         f"{sorted(alphas)}; a training goes on from one network_dim and network_alpha")
    unet = [name for name in modules if name.startswith(f"{UNET_PREFIX}_")]
    if not unet:
        raise ValueError(f"{spec.start_from} holds no UNet modules")
    update: dict[str, Any] = {
        "network_dim": ranks.pop(), "network_alpha": alphas.pop(),
        "network_target": "attention" if all(ATTENTION_NAME.search(name) for name in unet) else "transformer",
        "train_text_encoder": any(name.startswith(f"{TEXT_ENCODER_PREFIX}_") for name in modules),
    }
    weights = {f"{name}{part}": value.to(torch.float32) for name, parts in modules.items()
               for part, value in parts.items() if part != ".alpha"}
    return spec.model_copy(update=update), weights
