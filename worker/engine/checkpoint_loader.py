"""Load Stable Diffusion checkpoints (single files and diffusers folders) without touching a network.

Why: users bring ``.safetensors`` files from the WebUI ecosystem. diffusers can read them
(``from_single_file``), but on its own it fetches the matching diffusers configs from the model
hub, which these machines cannot reach. So the configs live in the repo
(``worker/assets/configs/<arch>/``) and this module decides which one a file needs by reading
only its safetensors header: key names, shapes and metadata. Nothing here ever unpickles
(``.ckpt`` / ``.pt`` files are refused before they are opened), because a pickle can run code.

diffusers does not report weights a checkpoint lacks (without ``accelerate`` they silently keep
their random initialisation), so :func:`load_pipeline` first checks that the file holds every
weight the bundled config expects, using the same key tables the project writes checkpoints with.

SD1.x files become a ``StableDiffusionPipeline``, SDXL files (SGM layout, detected from their
second text encoder ``conditioner.embedders.1.*``) a ``StableDiffusionXLPipeline``. A folder with a
``model_index.json`` is a diffusers folder and is loaded by :mod:`worker.engine.diffusers_folder`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.engine import ldm_layout

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "assets" / "configs"
METADATA_ARCH_KEY = "renderfarm_arch"
KNOWN_ARCHITECTURES = ("demo-tiny", "sd15", "sdxl", "demo-tiny-sdxl")
LOADABLE_ARCHITECTURES = KNOWN_ARCHITECTURES
SDXL_ARCHITECTURES = ("sdxl", "demo-tiny-sdxl")

# Probe keys (original layout) used to recognise an architecture from the header alone.
SD_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD_CLIP_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
SDXL_PREFIX = "conditioner.embedders.1."
SDXL_CLIP_L_TOKENS = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_OPEN_CLIP_TOKENS = "conditioner.embedders.1.model.token_embedding.weight"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class UnsupportedCheckpointError(ValueError):
    """The file is not a checkpoint this farm can load (wrong format, family or contents)."""


def is_sdxl(arch: str) -> bool:
    """True for architectures rendered with SDXL's two text encoders and size conditioning."""
    return arch in SDXL_ARCHITECTURES


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse the JSON header of a ``.safetensors`` file; no tensor data is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise UnsupportedCheckpointError(f"{path.name}: file too short to be safetensors")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise UnsupportedCheckpointError(f"{path.name}: not a valid safetensors file (bad header)")
            raw = json.loads(fh.read(length))
    except OSError as exc:
        raise UnsupportedCheckpointError(f"{path.name}: cannot read file: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedCheckpointError(f"{path.name}: not a valid safetensors file ({exc})") from exc
    if not isinstance(raw, dict):
        raise UnsupportedCheckpointError(f"{path.name}: not a valid safetensors file (header is not a map)")
    metadata = raw.pop("__metadata__", None) or {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for key, info in raw.items():
        if not isinstance(info, dict) or "shape" not in info:
            raise UnsupportedCheckpointError(f"{path.name}: malformed header entry {key!r}")
        shapes[key] = tuple(int(d) for d in info["shape"])
        dtypes[key] = str(info.get("dtype"))
    return SafetensorsHeader(metadata=dict(metadata), shapes=shapes, dtypes=dtypes)


def _require_safetensors(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise UnsupportedCheckpointError(
            f"{path.name}: only .safetensors checkpoints are supported; "
            f"{path.suffix or 'extensionless'} files may contain pickled code and are never opened"
        )


def detect_architecture(path: Path) -> str:
    """Return ``"demo-tiny"``, ``"demo-tiny-sdxl"``, ``"sd15"`` or ``"sdxl"`` from the file's header, or raise.

    Order: our own metadata tag, then SDXL's second text encoder (``conditioner.embedders.1.*``, with
    a 4-channel UNet and a 768-wide CLIP ViT-L beside it), then the SD1.x shape probes (UNet input
    conv ``[320, 4, 3, 3]`` and a 768-wide CLIP ViT-L text encoder).
    """
    path = Path(path)
    _require_safetensors(path)
    header = read_safetensors_header(path)
    shapes = header.shapes

    tagged = header.metadata.get(METADATA_ARCH_KEY)
    if tagged is not None:
        if tagged not in KNOWN_ARCHITECTURES:
            raise UnsupportedCheckpointError(f"{path.name}: unknown {METADATA_ARCH_KEY} {tagged!r}")
        return tagged

    unet_in = shapes.get(SD_UNET_IN)
    if unet_in is None:
        raise UnsupportedCheckpointError(
            f"{path.name}: no Stable Diffusion UNet found (missing {SD_UNET_IN}); "
            "LoRA, VAE or embedding files belong in their own folders"
        )
    if any(key.startswith(SDXL_PREFIX) for key in shapes):
        return _check_sdxl_shapes(path, shapes, unet_in)
    if SD2_OPEN_CLIP in shapes:
        raise UnsupportedCheckpointError(f"{path.name}: Stable Diffusion 2.x checkpoints are not supported")
    if unet_in[:2] != (320, 4):
        channels = unet_in[1] if len(unet_in) > 1 else "?"
        kind = "an inpainting model" if channels == 9 else f"a UNet with input shape {list(unet_in)}"
        raise UnsupportedCheckpointError(f"{path.name}: {kind} is not supported; only SD1.x txt2img")
    tokens = shapes.get(SD_CLIP_TOKENS)
    if tokens is None or tokens[-1] != 768:
        raise UnsupportedCheckpointError(
            f"{path.name}: SD1.x UNet found but no 768-wide CLIP text encoder "
            f"({SD_CLIP_TOKENS} is {list(tokens) if tokens else 'missing'})"
        )
    return "sd15"


def _check_sdxl_shapes(path: Path, shapes: dict[str, tuple[int, ...]], unet_in: tuple[int, ...]) -> str:
    if unet_in[1:2] != (4,):
        channels = unet_in[1] if len(unet_in) > 1 else "?"
        kind = "an SDXL inpainting model" if channels == 9 else f"an SDXL UNet with input shape {list(unet_in)}"
        raise UnsupportedCheckpointError(f"{path.name}: {kind} is not supported; only SDXL txt2img/img2img")
    clip_l, open_clip = shapes.get(SDXL_CLIP_L_TOKENS), shapes.get(SDXL_OPEN_CLIP_TOKENS)
    if clip_l is None or clip_l[-1] != 768 or open_clip is None:
        raise UnsupportedCheckpointError(
            f"{path.name}: SDXL-style file without SDXL base's two text encoders "
            f"({SDXL_CLIP_L_TOKENS} is {list(clip_l) if clip_l else 'missing'}, "
            f"{SDXL_OPEN_CLIP_TOKENS} is {list(open_clip) if open_clip else 'missing'})"
        )
    return "sdxl"


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
    if arch not in LOADABLE_ARCHITECTURES:
        raise UnsupportedCheckpointError(f"{path.name}: architecture {arch!r} cannot be loaded")
    config_dir = checkpoint_config_dir(arch)
    check_weights_present(path, config_dir)
    if is_sdxl(arch):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype
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
