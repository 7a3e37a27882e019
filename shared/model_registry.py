"""The models folder, laid out like the WebUI's (`Stable-diffusion/`, `Lora/`, `VAE/`, `embeddings/`).

Only `.safetensors` files are ever loaded; pickle formats are listed as refused and
never opened. Names resolve strictly inside the folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FieldError

CHECKPOINT_DIR = "Stable-diffusion"
WEBUI_FOLDERS = ("Stable-diffusion", "Lora", "VAE", "embeddings")
LOADABLE_SUFFIXES = (".safetensors",)
REFUSED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]\s*$")


@dataclass(frozen=True)
class CheckpointFile:
    name: str  # relative path without extension, "/" separated: the WebUI's model_name
    filename: str  # relative path with extension
    path: Path
    size: int
    refused_reason: str | None = None

    @property
    def loadable(self) -> bool:
        return self.refused_reason is None


def scan_checkpoints(models_dir: Path) -> list[CheckpointFile]:
    root = models_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found: list[CheckpointFile] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix not in LOADABLE_SUFFIXES + REFUSED_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        reason = None
        if suffix in REFUSED_SUFFIXES:
            reason = f"{suffix} files are pickles that can run code when loaded; only .safetensors are loaded"
        found.append(CheckpointFile(rel[: -len(path.suffix)], rel, path, path.stat().st_size, reason))
    return found


def default_checkpoint(models_dir: Path, configured: str | None) -> str | None:
    if configured:
        return configured
    loadable = [c for c in scan_checkpoints(models_dir) if c.loadable]
    return loadable[0].name if loadable else None


def resolve_checkpoint(
    models_dir: Path, requested: str, field: tuple[str | int, ...] = ("body", "model")
) -> CheckpointFile:
    """Find a checkpoint by name, file name or WebUI title (`name.safetensors [hash]`)."""
    name = _TITLE_HASH.sub("", requested.strip())
    if not name or name.startswith(("/", "\\")) or ".." in Path(name).parts or "\\" in name or "\x00" in name:
        raise FieldError(field, f"model {requested!r} is not a name inside the models folder")
    checkpoints = scan_checkpoints(models_dir)
    for ckpt in checkpoints:
        if name in (ckpt.name, ckpt.filename):
            if not ckpt.loadable:
                raise FieldError(field, f"model {requested!r} is refused: {ckpt.refused_reason}")
            return ckpt
    available = ", ".join(c.name for c in checkpoints if c.loadable) or "none"
    raise FieldError(field, f"unknown model {requested!r}; available models: {available}")
