"""Load Stable Diffusion checkpoints (single files and diffusers folders) without touching a network.

Why: users bring ``.safetensors`` files from the WebUI ecosystem. diffusers can read them
(``from_single_file``), but on its own it fetches the matching diffusers configs from the model
hub, which these machines cannot reach. So the configs live in the repo
(``worker/assets/configs/<arch>/``) and this module decides which one a file needs by reading
only its safetensors header: key names, shapes and metadata (the detector in
:mod:`shared.models.architecture`, the same one the API's model lists use). Nothing here ever unpickles
(``.ckpt`` / ``.pt`` files are refused before they are opened), because a pickle can run code.

diffusers does not report weights a checkpoint lacks (without ``accelerate`` they silently keep
their random initialisation), so :func:`load_pipeline` first checks that the file holds every
weight the bundled config expects, using the same key tables the project writes checkpoints with.

SD1.x files become a ``StableDiffusionPipeline``, SDXL files (SGM layout, detected from their
second text encoder ``conditioner.embedders.1.*``) a ``StableDiffusionXLPipeline``. A folder with a
``model_index.json`` is a diffusers folder and is loaded by :mod:`worker.engine.diffusers_folder`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shared.models.architecture import (
    KNOWN_ARCHITECTURES,
    UnsupportedCheckpointError,
    detect_architecture,
    is_sdxl,
)
from shared.models.safetensors_header import read_safetensors_header
from worker.engine import ldm_layout

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CONFIG_ROOT = ASSETS / "configs"
# The one copy of the CLIP BPE tokenizer every bundled architecture uses (SD1.x, and both of SDXL's).
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
# SDXL's second tokenizer (OpenCLIP ViT-bigG) is the same BPE padded with "!" (id 0), as open_clip pads.
SDXL_SECOND_PAD_TOKEN = "!"


def checkpoint_config_dir(arch: str) -> Path:
    """The bundled diffusers-format config folder for an architecture."""
    folder = CONFIG_ROOT / arch
    if arch not in KNOWN_ARCHITECTURES or not (folder / "model_index.json").is_file():
        raise UnsupportedCheckpointError(f"no bundled config for architecture {arch!r}")
    return folder


def expected_weights(config_dir: Path) -> dict[str, int]:
    """Original-layout key -> element count for every weight the config's models hold.

    The models are built on the ``meta`` device (no memory, no init cost) and their state-dict
    keys are mapped with the same tables :mod:`worker.engine.ldm_layout` writes files with.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    vae_config = AutoencoderKL.load_config(config_dir / "vae")
    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    second = config_dir / "text_encoder_2"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).state_dict()
        vae = AutoencoderKL.from_config(vae_config).state_dict()
        text = CLIPTextModel(text_config).state_dict()
        if second.is_dir():
            text_2 = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(second, local_files_only=True)
            ).state_dict()
    if second.is_dir():
        mapped = ldm_layout.sdxl_diffusers_to_ldm(unet, unet_config, vae, vae_config, text, text_2)
    else:
        mapped = ldm_layout.diffusers_to_ldm(unet, unet_config, vae, vae_config, text)
    return {key: tensor.numel() for key, tensor in mapped.items()}


def check_weights_present(path: Path, config_dir: Path) -> None:
    """Raise if the file lacks, or mis-sizes, any weight the bundled config needs."""
    shapes = read_safetensors_header(path).shapes
    missing, wrong = [], []
    for key, numel in expected_weights(config_dir).items():
        if key not in shapes:
            missing.append(key)
        elif math.prod(shapes[key]) != numel:
            wrong.append(f"{key} {list(shapes[key])}")
    if missing or wrong:
        details = "; ".join(
            part
            for part in (
                f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                f"{len(wrong)} with unexpected shapes (e.g. {', '.join(wrong[:3])})" if wrong else "",
            )
            if part
        )
        raise UnsupportedCheckpointError(f"{Path(path).name}: incomplete checkpoint for {config_dir.name}: {details}")


def bundled_tokenizers(arch: str) -> dict[str, Any]:
    """The tokenizers of a bundled architecture, from the one copy in ``worker/assets/clip_tokenizer``.

    The config folders hold no tokenizer files: ``from_single_file`` would read them from
    ``<config>/tokenizer*/``, so they are loaded here and passed in instead.
    """
    from transformers import CLIPTokenizer

    tokenizers = {"tokenizer": CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True)}
    if is_sdxl(arch):
        tokenizers["tokenizer_2"] = CLIPTokenizer.from_pretrained(
            CLIP_TOKENIZER_DIR, pad_token=SDXL_SECOND_PAD_TOKEN, local_files_only=True
        )
    return tokenizers


def load_pipeline(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load a checkpoint file or diffusers folder into a diffusers pipeline using only local files.

    A single file gives a ``StableDiffusionPipeline`` (SD1.x) or ``StableDiffusionXLPipeline`` (SDXL);
    a folder holding ``model_index.json`` is loaded as a diffusers folder (safetensors weights only).
    diffusers is imported lazily so that importing this module (and header-only detection) stays
    cheap. The safety checker is not loaded; the progress bar is disabled because the worker
    reports progress itself.
    """
    path = Path(path)
    if path.is_dir():
        from worker.engine.diffusers_folder import load_diffusers_folder

        return load_diffusers_folder(path, device, dtype)
    arch = detect_architecture(path)
    config_dir = checkpoint_config_dir(arch)
    check_weights_present(path, config_dir)
    if is_sdxl(arch):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **bundled_tokenizers(arch)
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **bundled_tokenizers(arch),
        )
    return finish_pipeline(pipe, device)


def finish_pipeline(pipe: DiffusionPipeline, device: str) -> DiffusionPipeline:
    """Progress bar off, onto the device; an SDXL VAE that must not run in fp16 is kept in fp32.

    SDXL's VAE (``force_upcast`` in its config) overflows to NaN (black images) in half precision;
    the WebUI reverts it to fp32 ("--no-half-vae"), and so does this. SD1.x VAEs are left alone.
    """
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    if text_encoder_2 is not None and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(dtype=torch.float32)
    return pipe
