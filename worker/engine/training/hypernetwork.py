"""Hypernetworks: the WebUI's ``create_hypernetwork`` and the trained side of ``train_hypernetwork``.

A module pair (keys, values) is built for each width of ``enable_sizes`` that some attention layer of the UNet
takes as its context (cross-attention: the text encoder's width, 768 on SD1.5; self-attention: the layer's
channels, 320/640/1280 on SD1.5); widths no layer uses are left out, and a training with none is refused.
The modules are :class:`worker.engine.hypernetworks.HypernetworkModule`, the class the renders rebuild files
with, so the saved state dicts load by their own key names; they are trained through
:func:`worker.engine.hypernetworks.applied`, the wrapper the renders use, with multiplier 1.

Initialisation is the WebUI's: "Normal" draws every Linear weight from N(0, 0.01) and zeroes the biases,
LayerNorms always so; Xavier and Kaiming (ReLU gain, leaky ReLU's for "leakyrelu") zero the biases, the
random draws seeded from the training's seed. Dropout follows the WebUI's ``dropout_structure`` (one
probability after each layer, first and last 0; without ``use_dropout`` and a structure, no dropout, as the
WebUI's ``create_hypernetwork`` sets it) and draws from the step's seed. The optimizer is the WebUI's default
AdamW (weight decay 0.01).

The output is the WebUI's ``.pt``: ``torch.save`` of a plain dict ``{width: [k.state_dict(), v.state_dict()],
'step', 'name', 'layer_structure', ...}`` that both the WebUI and ``load_hypernetwork`` read.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Literal

import torch

from shared.jobs.training_spec import TrainSpec
from worker.engine.conditioning import PromptEncoder
from worker.engine.hypernetworks import Hypernetwork, HypernetworkModule, applied
from worker.engine.training import seeding


def attention_widths(unet: torch.nn.Module) -> set[int]:
    """The context widths of the UNet's attention layers (the layers ``applied`` wraps)."""
    widths = set()
    for module in unet.modules():
        if hasattr(module, "to_k") and hasattr(module, "to_v") and hasattr(module, "heads"):
            width = getattr(module.to_k, "in_features", None)
            if width is not None:
                widths.add(int(width))
    return widths


def dropout_structure(spec: TrainSpec) -> list[float]:
    """The dropout probability after each layer (the WebUI's ``dropout_structure``)."""
    count = len(spec.layer_structure)
    if not (spec.use_dropout and spec.dropout_structure):
        return [0.0] * count
    structure = [float(p) for p in spec.dropout_structure]
    if len(structure) != count or structure[0] != 0 or structure[-1] != 0 or not all(0 <= p < 1 for p in structure):
        raise ValueError(f"dropout_structure {structure} must have one probability in [0, 1) per entry of "
                         f"layer_structure ({count}), the first and the last 0")
    return structure


def _initialise(module: HypernetworkModule, weight_init: str, activation: str) -> None:
    nonlinearity: Literal["leaky_relu", "relu"] = "leaky_relu" if activation == "leakyrelu" else "relu"
    for layer in module.linear:
        if not isinstance(layer, torch.nn.Linear | torch.nn.LayerNorm):
            continue
        weight, bias = layer.weight.data, layer.bias.data
        if weight_init == "Normal" or isinstance(layer, torch.nn.LayerNorm):
            torch.nn.init.normal_(weight, mean=0.0, std=0.01)
        elif weight_init == "XavierUniform":
            torch.nn.init.xavier_uniform_(weight)
        elif weight_init == "XavierNormal":
            torch.nn.init.xavier_normal_(weight)
        elif weight_init == "KaimingUniform":
            torch.nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
        elif weight_init == "KaimingNormal":
            torch.nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
        else:
            raise ValueError(f"unknown weight initialisation {weight_init!r}")
        torch.nn.init.zeros_(bias)


def build_module(size: int, spec: TrainSpec, structure: list[float]) -> HypernetworkModule:
    """One module laid out as the renders' loader lays it out for the flags the file will hold, with the
    structure's dropout probabilities; a structure that loader cannot lay out is refused."""
    module = HypernetworkModule(size, [float(x) for x in spec.layer_structure], spec.activation_func,
                                spec.add_layer_norm, dropout=any(structure), activate_output=False,
                                last_layer_dropout=structure[-2] > 0)
    after: list[int] = []  # the layer index each dropout follows
    linear = -1
    for layer in module.linear:
        if isinstance(layer, torch.nn.Linear):
            linear += 1
        elif isinstance(layer, torch.nn.Dropout):
            layer.p = structure[linear + 1]
            after.append(linear)
    wanted = [i for i in range(len(structure) - 1) if structure[i + 1] > 0]
    if after != wanted:
        raise ValueError(f"dropout_structure {structure}: the hypernetwork loader places dropout after every "
                         "hidden layer but the last, and after the last one too or not; this structure differs")
    _initialise(module, spec.weight_init, spec.activation_func)
    return module


class HypernetworkTrainee:
    """The module pairs being trained, wrapped around the UNet's attention keys and values."""

    def __init__(self, pipeline: Any, spec: TrainSpec) -> None:
        self.spec = spec
        self.placeholder = spec.name  # the WebUI's training dataset puts the hypernetwork's name for [name]
        self.unet = pipeline.unet
        widths = attention_widths(self.unet)
        sizes = list(dict.fromkeys(size for size in spec.enable_sizes if size in widths))
        if not sizes:
            raise ValueError(f"none of enable_sizes {list(spec.enable_sizes)} is a context width of this model's "
                             f"attention layers ({sorted(widths)})")
        self.structure = dropout_structure(spec)
        layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
        with torch.random.fork_rng(devices=[]):  # the modules' own initialisation draws from the global RNG
            torch.default_generator.manual_seed(seeding.derived_seed(spec.seed, seeding.INIT))
            for size in sizes:
                layers[size] = (build_module(size, spec, self.structure), build_module(size, spec, self.structure))
        self.network = Hypernetwork(spec.name, layers).to(self.unet.device, torch.float32)
        self.network.set_multiplier(1.0)
        self.set_training(False)
        self.encoder = PromptEncoder(pipeline.tokenizer, pipeline.text_encoder)

    def modules(self) -> list[tuple[str, HypernetworkModule]]:
        return [(f"{size}.{j}", module) for size, pair in self.network.layers.items()
                for j, module in enumerate(pair)]

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, module in self.modules() for p in module.parameters()]

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1.0)  # lr is set every step

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{key}": value for prefix, module in self.modules()
                for key, value in module.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        mine = self.tensors()
        if set(tensors) != set(mine) or any(tensors[k].shape != mine[k].shape for k in mine):
            raise ValueError("the checkpoint's tensors do not fit this hypernetwork")
        with torch.no_grad():
            for key, value in mine.items():
                value.copy_(tensors[key])

    def applied(self) -> contextlib.AbstractContextManager[None]:
        return applied(self.unet, [(self.network, 1.0)])

    def set_training(self, on: bool) -> None:
        for _, module in self.modules():
            module.train(on)

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder.encode(prompts)

    def output(self, step: int) -> bytes:
        return hypernetwork_file(self.network, step, self.spec, self.structure)


def _plain(module: HypernetworkModule) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", torch.float32).clone() for key, value in module.state_dict().items()}


def hypernetwork_file(network: Hypernetwork, step: int, spec: TrainSpec, structure: list[float]) -> bytes:
    """The WebUI's ``Hypernetwork.save`` dict, as bytes."""
    state: dict[Any, Any] = {size: [_plain(k), _plain(v)] for size, (k, v) in network.layers.items()}
    state.update({
        "step": step, "name": spec.name, "layer_structure": [float(x) for x in spec.layer_structure],
        "activation_func": spec.activation_func, "is_layer_norm": spec.add_layer_norm,
        "weight_initialization": spec.weight_init, "sd_checkpoint": spec.model_hash,
        "sd_checkpoint_name": spec.model, "activate_output": False,
        # The WebUI saves its use_dropout flag; any() is what it means once dropout_structure is known, and what
        # the farm's loader (which lays dropout out from this flag) needs.
        "use_dropout": any(structure), "dropout_structure": structure, "last_layer_dropout": structure[-2] > 0,
        "optional_info": None,
    })
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
