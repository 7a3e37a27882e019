"""Load a diffusers-format model folder (``save_pretrained`` layout) with safetensors weights only.

Why its own checks: ``from_pretrained`` falls back to ``.bin`` pickles when a component has no
safetensors file, and (without ``accelerate``) leaves weights a file lacks at their random
initialisation without a word. So the folder is vetted first from its JSON files
(:func:`shared.models.registry.inspect_diffusers_folder`: known pipeline and component classes,
safetensors weights for every model), loaded with ``use_safetensors=True`` so no pickle is ever
opened, and every model's weights are checked against its config from the safetensors headers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shared.models.architecture import UnsupportedCheckpointError
from shared.models.registry import WEIGHT_COMPONENTS, inspect_diffusers_folder
from shared.models.safetensors_header import read_safetensors_header
from worker.engine.checkpoint_loader import finish_pipeline

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

FP16_VARIANT = "fp16"


def _weight_files(component: Path, variant: str | None) -> list[Path]:
    files = sorted(component.glob("*.safetensors"))
    return [f for f in files if (f".{FP16_VARIANT}" in f.name) == (variant == FP16_VARIANT)]


def folder_variant(folder: Path, components: list[str]) -> str | None:
    """``"fp16"`` when a component only has fp16-variant weights (the hub's ``*.fp16.safetensors``)."""
    for name in components:
        if not _weight_files(folder / name, None) and _weight_files(folder / name, FP16_VARIANT):
            return FP16_VARIANT
    return None


def _meta_state_dict(component: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict a component's config describes, built on the meta device (no memory, no init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if name == "unet":
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(component)).state_dict()
        if name == "vae":
            return AutoencoderKL.from_config(AutoencoderKL.load_config(component)).state_dict()
        config = CLIPTextConfig.from_pretrained(component, local_files_only=True)
        model = CLIPTextModelWithProjection(config) if name == "text_encoder_2" else CLIPTextModel(config)
        return model.state_dict()


def _normalise(key: str) -> str:
    # transformers versions differ on the "text_model." level of CLIPTextModel keys; both load.
    return key.removeprefix("text_model.")


def check_component_weights(component: Path, name: str, variant: str | None) -> None:
    """Raise if the component's safetensors files lack, or mis-size, a weight its config needs."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _weight_files(component, variant):
        shapes.update({_normalise(k): v for k, v in read_safetensors_header(file).shapes.items()})
    missing, wrong = [], []
    for key, tensor in _meta_state_dict(component, name).items():
        if key.endswith("position_ids"):
            continue  # a buffer transformers rebuilds itself
        found = shapes.get(_normalise(key))
        if found is None:
            missing.append(key)
        elif math.prod(found) != tensor.numel():
            wrong.append(f"{key} {list(found)}")
    if missing or wrong:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(wrong)} with unexpected shapes (e.g. {', '.join(wrong[:3])})" if wrong else ""]
        raise UnsupportedCheckpointError(
            f"{component.parent.name}: incomplete {name} weights: {'; '.join(p for p in parts if p)}"
        )


def load_diffusers_folder(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load an SD1.x or SDXL diffusers folder offline; refuse it before anything is unpickled."""
    folder = Path(folder)
    info = inspect_diffusers_folder(folder)
    if info.problem is not None:
        raise UnsupportedCheckpointError(f"{folder.name}: {info.problem}")
    components = [name for name in WEIGHT_COMPONENTS if (folder / name).is_dir()]
    variant = folder_variant(folder, components)
    for name in components:
        check_component_weights(folder / name, name, variant)
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "torch_dtype": dtype}
    if variant is not None:
        kwargs["variant"] = variant
    if info.architecture == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), **kwargs)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs
        )
    return finish_pipeline(pipe, device)
