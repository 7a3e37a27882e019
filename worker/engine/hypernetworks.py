"""Hypernetworks as the WebUI applies them (``<hypernet:name:multiplier>``, issue 15).

A hypernetwork file (the WebUI's ``.pt``, saved by ``Hypernetwork.save``) maps a context width (768, 320, 640,
1280, ...) to a pair of small MLPs, one for the attention's keys and one for its values. In every attention layer
whose context has such a width (cross-attention: the text encoder's; self-attention: the layer's channels), the
keys are computed from ``k(context)`` and the values from ``v(context)`` instead of the context itself, where each
module is ``x + mlp(x) * multiplier``; several hypernetworks apply one after the other. The MLP is rebuilt layer
by layer as the WebUI builds it (linear layers sized by ``layer_structure``, the activation between them, layer
norms and dropouts where its flags put them), so the saved state dicts load by their own key names.

Files are read only with torch's ``weights_only`` unpickler (tensors and plain containers; nothing runs). The
modules wrap each attention's ``to_k``/``to_v`` for the batch being rendered and are taken off afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.errors import FieldError

_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU, "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
}
# As the WebUI: any other activation of torch.nn by its lower-case class name ("gelu", "mish", ...).
_ACTIVATIONS.update({name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation)
                     if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"
                     and name.lower() not in _ACTIVATIONS})
# Key names of the WebUI's oldest hypernetwork files, as its loader renames them.
OLD_KEYS = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
            "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}


class HypernetworkModule(torch.nn.Module):
    """``x + linear(x) * multiplier`` with ``linear`` built as the WebUI's ``HypernetworkModule`` builds it."""

    def __init__(self, dim: int, layer_structure: Sequence[float], activation: str | None, layer_norm: bool,
                 dropout: bool, activate_output: bool, last_layer_dropout: bool) -> None:
        super().__init__()
        if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
            raise ValueError(f"layer structure {list(layer_structure)} must start and end with 1")
        layers: list[torch.nn.Module] = []
        count = len(layer_structure)
        for i in range(count - 1):
            layers.append(torch.nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if activation not in (None, "linear") and (i < count - 2 or activate_output):
                if activation not in _ACTIVATIONS:
                    raise ValueError(f"unsupported activation function {activation!r}")
                layers.append(_ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(torch.nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout and (i < count - 3 or (last_layer_dropout and i < count - 2)):
                layers.append(torch.nn.Dropout(p=0.3))
        self.linear = torch.nn.Sequential(*layers)
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


@dataclass
class Hypernetwork:
    name: str
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]

    def to(self, device: Any, dtype: torch.dtype) -> Hypernetwork:
        for pair in self.layers.values():
            for module in pair:
                module.to(device=device, dtype=dtype)
        return self

    def set_multiplier(self, multiplier: float) -> None:
        for pair in self.layers.values():
            for module in pair:
                module.multiplier = multiplier


def load_hypernetwork(path: Path, field: tuple[str | int, ...] = ("body", "prompt")) -> Hypernetwork:
    """Read a WebUI hypernetwork file (weights only) and rebuild its modules; a FieldError names the prompt."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickler refusal, a truncated file, not a torch file
        raise FieldError(field, f"hypernetwork {path.name} cannot be read with the weights-only loader: "
                                f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise FieldError(field, f"hypernetwork {path.name} is not a WebUI hypernetwork (no dict of layers)")
    settings = dict(layer_structure=[float(x) for x in state.get("layer_structure") or [1, 2, 1]],
                    activation=state.get("activation_func"), layer_norm=bool(state.get("is_layer_norm", False)),
                    dropout=bool(state.get("use_dropout", False)),
                    activate_output=bool(state.get("activate_output", True)),
                    last_layer_dropout=bool(state.get("last_layer_dropout", False)))
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    try:
        for size, pair in state.items():
            if not isinstance(size, int):
                continue
            modules = []
            for weights in pair[:2]:
                module = HypernetworkModule(size, **settings)  # type: ignore[arg-type]
                module.load_state_dict({OLD_KEYS.get(k, k): v for k, v in dict(weights).items()})
                module.eval().requires_grad_(False)
                modules.append(module)
            layers[size] = (modules[0], modules[1])
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise FieldError(field, f"hypernetwork {path.name} does not match its own layer settings: {exc}") from exc
    if not layers:
        raise FieldError(field, f"hypernetwork {path.name} holds no layers")
    return Hypernetwork(str(state.get("name") or path.stem), layers)


class _HyperProjection(torch.nn.Module):
    """An attention's ``to_k`` or ``to_v`` fed through the hypernetworks' modules for its context width."""

    def __init__(self, projection: torch.nn.Module, modules: dict[int, list[HypernetworkModule]]) -> None:
        super().__init__()
        self.projection = projection
        self.hyper = modules

    def forward(self, context: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for module in self.hyper.get(context.shape[-1], ()):
            context = module(context)
        return self.projection(context, *args, **kwargs)


@contextlib.contextmanager
def applied(unet: torch.nn.Module, hypernetworks: Sequence[tuple[Hypernetwork, float]]) -> Iterator[None]:
    """Every attention layer of ``unet`` computes its keys and values through the hypernetworks, in order, with
    their multipliers, for the block; as it was afterwards."""
    if not hypernetworks:
        yield
        return
    keys: dict[int, list[HypernetworkModule]] = {}
    values: dict[int, list[HypernetworkModule]] = {}
    for hypernetwork, multiplier in hypernetworks:
        hypernetwork.set_multiplier(multiplier)
        for size, (k, v) in hypernetwork.layers.items():
            keys.setdefault(size, []).append(k)
            values.setdefault(size, []).append(v)
    swapped = []
    for module in unet.modules():
        if hasattr(module, "to_k") and hasattr(module, "to_v") and hasattr(module, "heads"):
            swapped.append((module, module.to_k, module.to_v))
            module.to_k = _HyperProjection(module.to_k, keys)
            module.to_v = _HyperProjection(module.to_v, values)
    try:
        yield
    finally:
        for module, to_k, to_v in swapped:
            module.to_k, module.to_v = to_k, to_v
