"""Annotators with weights, run on the worker before the denoising loop (see :mod:`shared.controlnet.annotators`).

HED: lllyasviel's Apache-2.0 "ControlNetHED" network (five VGG-like double-conv blocks, each with a 1x1 side
projection; RGB input minus a learnt mean), as the extension runs it (``annotator/hed``, ``legacy/processor.py``):
the image is resized with padding to the processor resolution, each side output is resized back bilinearly,
the edge map is the sigmoid of their mean (``hed_safe`` quantises it with ``safe_step``), and ``scribble_hed``
thins it with the extension's NMS, blurs and binarises it.

Weights are read with safetensors, or from the extension's ``.pth`` with torch's ``weights_only`` unpickler,
which rebuilds tensors and runs no code (a booby-trapped file is refused). Loaded networks are cached per
process and device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from shared.controlnet.annotators import WORKER_ANNOTATORS, weight_file
from shared.controlnet.preprocessors import HWC3, PreprocessorUnavailable, resize_image_with_pad, resolve_module
from shared.controlnet.preprocessors import resolve_params as slider_values

__all__ = ["HedNetwork", "run_annotator"]


class _DoubleConv(torch.nn.Module):
    def __init__(self, channels_in: int, channels_out: int, layers: int) -> None:
        super().__init__()
        self.convs = torch.nn.Sequential(*[
            torch.nn.Conv2d(channels_in if i == 0 else channels_out, channels_out, 3, 1, padding=1)
            for i in range(layers)])
        self.projection = torch.nn.Conv2d(channels_out, 1, 1, 1, padding=0)

    def forward(self, x: torch.Tensor, down: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down:
            x = torch.nn.functional.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = torch.nn.functional.relu(conv(x))
        return x, self.projection(x)


class HedNetwork(torch.nn.Module):
    """ControlNetHED (state-dict keys ``norm``, ``block{1..5}.convs.N``, ``block{1..5}.projection``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _DoubleConv(3, 64, 2)
        self.block2 = _DoubleConv(64, 128, 2)
        self.block3 = _DoubleConv(128, 256, 3)
        self.block4 = _DoubleConv(256, 512, 3)
        self.block5 = _DoubleConv(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for index, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, down=index > 0)
            sides.append(side)
        return sides


_LOADED: dict[tuple[str, str], Any] = {}


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refuses anything but tensors and containers
        raise PreprocessorUnavailable(path.name, f"{path.name} is not a plain weights file ({exc})") from exc
    if not isinstance(loaded, dict):
        raise PreprocessorUnavailable(path.name, f"{path.name} does not hold a state dict")
    return loaded


def _hed(models_dir: Path, device: str) -> HedNetwork:
    path = weight_file(models_dir, "hed/ControlNetHED.pth")
    if path is None:
        raise PreprocessorUnavailable("hed", "hed/ControlNetHED.pth is not in models/ControlNet/annotators")
    key = (str(path), device)
    if key not in _LOADED:
        network = HedNetwork()
        try:
            network.load_state_dict(_state_dict(path))
        except RuntimeError as exc:
            raise PreprocessorUnavailable("hed", f"{path.name} is not ControlNetHED's weights ({exc})") from exc
        _LOADED[key] = network.to(device).float().eval()
    return _LOADED[key]  # type: ignore[no-any-return]


def _safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def _nms(x: np.ndarray, threshold: int, sigma: float) -> np.ndarray:
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kernels = [np.array(k, dtype=np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    y = np.zeros_like(x)
    for kernel in kernels:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    z = np.zeros_like(y, dtype=np.uint8)
    z[y > threshold] = 255
    return z


@torch.no_grad()
def hed_edges(network: HedNetwork, image: np.ndarray, safe: bool, device: str) -> np.ndarray:
    height, width = image.shape[:2]
    tensor = torch.from_numpy(image.copy()).float().to(device).permute(2, 0, 1)[None]
    sides = [side.detach().cpu().numpy().astype(np.float32)[0, 0] for side in network(tensor)]
    stacked = np.stack([cv2.resize(side, (width, height), interpolation=cv2.INTER_LINEAR) for side in sides], axis=2)
    edge = 1 / (1 + np.exp(-np.mean(stacked, axis=2).astype(np.float64)))
    if safe:
        edge = _safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def run_annotator(name: str, image: np.ndarray, processor_res: float, threshold_a: float, threshold_b: float,
                  models_dir: Path, device: str = "cpu") -> np.ndarray:
    """Run a weight-needing module the workers implement; raises PreprocessorUnavailable otherwise."""
    module = resolve_module(name)
    if module.name not in WORKER_ANNOTATORS:
        files = ", ".join(module.weight_files) or "a model package"
        raise PreprocessorUnavailable(module.name, f"needs annotator weights ({files}) and a loader this farm "
                                                   "does not have")
    resolution = slider_values(module, processor_res, threshold_a, threshold_b)[0]
    network = _hed(models_dir, device)
    padded, remove_pad = resize_image_with_pad(HWC3(np.asarray(image)), resolution)
    edges = remove_pad(hed_edges(network, padded, module.name == "hed_safe", device))
    if module.name == "scribble_hed":
        edges = _nms(edges, 127, 3.0)
        edges = cv2.GaussianBlur(edges, (0, 0), 3.0)
        edges[edges > 4] = 255
        edges[edges < 255] = 0
    return HWC3(edges)
