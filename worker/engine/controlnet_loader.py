"""Load ControlNet weights (single files in either layout, diffusers folders) with local configs only.

``ControlNetModel.from_single_file`` reads the extension's ``control_model.*`` layout and single files already in
diffusers' names, but without ``config=`` it fetches a config from the hub; the configs are bundled in
``worker/assets/configs/controlnet/<arch>/``, chosen by the header detector the API lists models with
(:func:`shared.controlnet.models.detect_controlnet`). diffusers' conversion of the ``control_model.*`` layout
leaves out SDXL's ``label_emb`` (the pooled-text and size embedding), so an SDXL file in that layout is converted
here with diffusers' own converter plus that one module, then handed to ``from_single_file`` as a state dict.

As for checkpoints, diffusers keeps random weights where a file lacks some, so every weight the config needs
is checked against the header first (same key tables the project writes files with).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shared.controlnet.models import DIFFUSERS_WEIGHTS, detect_controlnet
from shared.models.architecture import UnsupportedCheckpointError, require_safetensors
from shared.models.safetensors_header import InvalidSafetensorsError, read_safetensors_header
from worker.engine import ldm_layout
from worker.engine.checkpoint_loader import CONFIG_ROOT

if TYPE_CHECKING:
    from diffusers import ControlNetModel

CONTROLNET_CONFIGS = CONFIG_ROOT / "controlnet"


def controlnet_config_dir(arch: str) -> Path:
    folder = CONTROLNET_CONFIGS / arch
    if not (folder / "config.json").is_file():
        raise UnsupportedCheckpointError(f"no bundled ControlNet config for architecture {arch!r}")
    return folder


def _expected_shapes(config_dir: Path, layout: str) -> dict[str, tuple[int, ...]]:
    from diffusers import ControlNetModel

    config = ControlNetModel.load_config(config_dir)
    with torch.device("meta"):
        state = ControlNetModel.from_config(config).state_dict()
    if layout == "ldm":
        state = ldm_layout.controlnet_to_ldm(state, config)
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _check_complete(path: Path, config_dir: Path, layout: str, prefix: str) -> None:
    shapes = read_safetensors_header(path).shapes
    missing, wrong = [], []
    for key, shape in _expected_shapes(config_dir, layout).items():
        found = shapes.get(key if layout == "diffusers" else prefix + key.removeprefix(ldm_layout.CONTROLNET_PREFIX))
        if found is None:
            missing.append(key)
        elif math.prod(found) != math.prod(shape):
            wrong.append(f"{key} {list(found)}")
    if missing or wrong:
        raise UnsupportedCheckpointError(
            f"{path.name}: not a complete {config_dir.name} ControlNet: "
            + "; ".join(part for part in (
                f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})" if missing else "",
                f"{len(wrong)} with other shapes (e.g. {', '.join(wrong[:3])}; a smaller 'mid'/'small' variant?)"
                if wrong else "") if part))


def _sdxl_ldm_state(path: Path, config_dir: Path, prefix: str) -> dict[str, Any]:
    """An SDXL file in the ``control_model.*`` layout, in diffusers' names (their converter + ``label_emb``)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    raw = load_file(str(path))
    state = {key.removeprefix(prefix): tensor for key, tensor in raw.items()}
    converted = convert_controlnet_checkpoint(state, ControlNetModel.load_config(config_dir))
    for ldm, diffusers in (("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")):
        for kind in ("weight", "bias"):
            converted[f"{diffusers}.{kind}"] = state[f"{ldm}.{kind}"]
    return converted


def load_controlnet(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ControlNetModel:
    """A ControlNet file or diffusers folder on ``device`` in ``dtype``, in eval mode. Raises
    UnsupportedCheckpointError (with the reason) for anything the farm does not load; never unpickles."""
    from diffusers import ControlNetModel

    path = Path(path)
    weights = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
    require_safetensors(weights)
    try:
        header = read_safetensors_header(weights)
    except (InvalidSafetensorsError, OSError) as exc:
        raise UnsupportedCheckpointError(f"{path.name}: {exc}") from exc
    detection = detect_controlnet(header, path.name)
    if detection.problem is not None or detection.architecture is None or detection.layout is None:
        raise UnsupportedCheckpointError(detection.problem or f"{path.name}: not a ControlNet")
    if path.is_dir():
        model = ControlNetModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                torch_dtype=dtype)
    else:
        config_dir = controlnet_config_dir(detection.architecture)
        prefix = "control_model." if any(key.startswith("control_model.") for key in header.shapes) else ""
        _check_complete(weights, config_dir, detection.layout, prefix)
        source: Any = str(path)
        if detection.layout == "ldm" and detection.family == "sdxl":
            source = _sdxl_ldm_state(path, config_dir, prefix)
        model = ControlNetModel.from_single_file(source, config=str(config_dir), local_files_only=True,
                                                 torch_dtype=dtype)
    return model.to(device).eval()
