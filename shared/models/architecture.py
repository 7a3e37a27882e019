"""Which model family a checkpoint is, from its safetensors header alone (no torch).

One detector for both processes: the API lists every checkpoint with its architecture (an unknown
file shows None, since a list should show every file), and the worker picks the bundled config a
file needs and refuses, with a reason, what it cannot render. Both read the same probes in the same
order: our own metadata tag, then SDXL's second text encoder (``conditioner.embedders.1.*``), then
the SD1.x shape probes (UNet input conv ``[320, 4, 3, 3]`` and a 768-wide CLIP ViT-L text encoder).
A diffusers folder's family comes from its ``model_index.json`` pipeline class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.models.registry import inspect_diffusers_folder
from shared.models.safetensors_header import (
    InvalidSafetensorsError,
    SafetensorsHeader,
    read_safetensors_header,
    safetensors_header_or_none,
)

METADATA_ARCH_KEY = "renderfarm_arch"
KNOWN_ARCHITECTURES = ("demo-tiny", "sd15", "sdxl", "demo-tiny-sdxl")
SDXL_ARCHITECTURES = ("sdxl", "demo-tiny-sdxl")

# Probe keys (original layout) used to recognise an architecture from the header alone.
SD_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD_CLIP_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
SDXL_PREFIX = "conditioner.embedders.1."
SDXL_CLIP_L_TOKENS = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_OPEN_CLIP_TOKENS = "conditioner.embedders.1.model.token_embedding.weight"


class UnsupportedCheckpointError(ValueError):
    """The file is not a checkpoint this farm can load (wrong format, family or contents)."""


def is_sdxl(arch: str) -> bool:
    """True for architectures rendered with SDXL's two text encoders and size conditioning."""
    return arch in SDXL_ARCHITECTURES


@dataclass(frozen=True)
class Detection:
    """``architecture``: the family the header points to (None when it points to none we know);
    ``problem``: why the farm cannot render the file (None when it can)."""

    architecture: str | None
    problem: str | None = None


def detect_from_header(header: SafetensorsHeader, name: str) -> Detection:
    """The probes, in order; ``name`` (the file name) starts every problem message."""
    shapes = header.shapes
    tagged = header.metadata.get(METADATA_ARCH_KEY)
    if tagged is not None:
        known = tagged in KNOWN_ARCHITECTURES
        return Detection(tagged or None, None if known else f"{name}: unknown {METADATA_ARCH_KEY} {tagged!r}")

    unet_in = shapes.get(SD_UNET_IN)
    sdxl = any(key.startswith(SDXL_PREFIX) for key in shapes)
    if unet_in is None:
        return Detection("sdxl" if sdxl else None, (
            f"{name}: no Stable Diffusion UNet found (missing {SD_UNET_IN}); "
            "LoRA, VAE or embedding files belong in their own folders"
        ))
    if sdxl:
        return Detection("sdxl", _sdxl_problem(name, shapes, unet_in))
    if SD2_OPEN_CLIP in shapes:
        return Detection(None, f"{name}: Stable Diffusion 2.x checkpoints are not supported")
    if unet_in[:2] != (320, 4):
        channels = unet_in[1] if len(unet_in) > 1 else "?"
        kind = "an inpainting model" if channels == 9 else f"a UNet with input shape {list(unet_in)}"
        return Detection(None, f"{name}: {kind} is not supported; only SD1.x txt2img")
    tokens = shapes.get(SD_CLIP_TOKENS)
    if tokens is None or tokens[-1:] != (768,):
        return Detection("sd15", (
            f"{name}: SD1.x UNet found but no 768-wide CLIP text encoder "
            f"({SD_CLIP_TOKENS} is {list(tokens) if tokens else 'missing'})"
        ))
    return Detection("sd15")


def _sdxl_problem(name: str, shapes: dict[str, tuple[int, ...]], unet_in: tuple[int, ...]) -> str | None:
    if unet_in[1:2] != (4,):
        channels = unet_in[1] if len(unet_in) > 1 else "?"
        kind = "an SDXL inpainting model" if channels == 9 else f"an SDXL UNet with input shape {list(unet_in)}"
        return f"{name}: {kind} is not supported; only SDXL txt2img/img2img"
    clip_l, open_clip = shapes.get(SDXL_CLIP_L_TOKENS), shapes.get(SDXL_OPEN_CLIP_TOKENS)
    if clip_l is None or clip_l[-1:] != (768,) or open_clip is None:
        return (
            f"{name}: SDXL-style file without SDXL base's two text encoders "
            f"({SDXL_CLIP_L_TOKENS} is {list(clip_l) if clip_l else 'missing'}, "
            f"{SDXL_OPEN_CLIP_TOKENS} is {list(open_clip) if open_clip else 'missing'})"
        )
    return None


def require_safetensors(path: Path) -> None:
    """Refuse every other format before the file is opened: pickles (``.ckpt``, ``.pt``...) can run code."""
    if path.suffix.lower() != ".safetensors":
        raise UnsupportedCheckpointError(
            f"{path.name}: only .safetensors checkpoints are supported; "
            f"{path.suffix or 'extensionless'} files may contain pickled code and are never opened"
        )


def detect_architecture(path: Path) -> str:
    """Return ``"demo-tiny"``, ``"demo-tiny-sdxl"``, ``"sd15"`` or ``"sdxl"`` for a file the farm can
    render, or raise :class:`UnsupportedCheckpointError` saying why not (the worker's view)."""
    path = Path(path)
    require_safetensors(path)
    try:
        header = read_safetensors_header(path)
    except InvalidSafetensorsError as exc:
        raise UnsupportedCheckpointError(str(exc)) from exc
    found = detect_from_header(header, path.name)
    if found.problem is not None or found.architecture is None:
        raise UnsupportedCheckpointError(found.problem or f"{path.name}: not a known checkpoint")
    return found.architecture


def checkpoint_architecture(path: Path) -> str | None:
    """The family a checkpoint file or diffusers folder belongs to, or None (the lists' view).

    Unknown is None rather than an error, since a list should show every file; the worker gives
    the precise refusal when a job uses it. A family is shown even when the worker will refuse the
    file for a missing part (an SD1.x UNet without its text encoder is still ``sd15``).
    """
    path = Path(path)
    if path.is_dir():
        return inspect_diffusers_folder(path).architecture
    if not path.exists():
        from shared.models.store_registry import record_at

        record = record_at(path)  # a model store checkpoint this machine does not hold (yet)
        return record.architecture if record is not None else None
    if path.suffix.lower() != ".safetensors":
        return None
    header = safetensors_header_or_none(path)
    return detect_from_header(header, path.name).architecture if header is not None else None
