"""What the models folder holds, in the shapes of the WebUI's list routes (sd-models, sd-vae, loras, ...).

Every list is read from the folder on each call (the farm keeps no in-memory model list in the
gateway), so the ``refresh-*`` routes have nothing to rebuild and adding a file needs no restart.
Hashes come from the shared on-disk cache, so a checkpoint is hashed once, not once per request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.models.files import VAE_DIR, list_model_files
from shared.models.registry import (
    CHECKPOINT_DIR,
    CheckpointFile,
    default_checkpoint,
    resolve_checkpoint,
    scan_checkpoints,
)
from shared.models.safetensors_header import safetensors_header_or_none
from shared.models.store_registry import record_at
from shared.models.upscalers import BUILTIN_UPSCALERS, LATENT_UPSCALERS, scan_upscalers
from shared.settings import Settings
from shared.webui.hashes import HashCache

__all__ = [
    "LORA_DIR", "EMBEDDINGS_DIR", "checkpoint_title", "current_checkpoint", "embeddings", "hash_cache", "loras",
    "sd_models", "upscalers", "vaes",
]

LORA_DIR = "Lora"
EMBEDDINGS_DIR = "embeddings"


def hash_cache(settings: Settings) -> HashCache:
    return HashCache.of_models_dir(settings.models.models_dir)


def checkpoint_title(ckpt: CheckpointFile, cache: HashCache) -> str:
    """The WebUI's title, ``file.safetensors [0123456789]``: what clients show and send back."""
    return f"{ckpt.filename} [{cache.checkpoint(ckpt.path)}]"


def current_checkpoint(settings: Settings, chosen: str | None) -> CheckpointFile | None:
    """The key's chosen checkpoint, else the farm's default; None when nothing is installed."""
    name = chosen or default_checkpoint(settings.models.models_dir, settings.models.default_model)
    if name is None:
        return None
    return resolve_checkpoint(settings.models.models_dir, name)


def sd_models(settings: Settings) -> list[dict[str, Any]]:
    cache = hash_cache(settings)
    models = []
    for ckpt in scan_checkpoints(settings.models.models_dir):
        if not ckpt.loadable:
            continue
        sha = cache.sha256(ckpt.path)
        models.append({
            "title": f"{ckpt.filename} [{sha[:10]}]",
            "model_name": ckpt.name,
            "hash": sha[:10],
            "sha256": sha,
            "filename": f"{CHECKPOINT_DIR}/{ckpt.filename}",
            "config": None,
        })
    return models


def _loadable(settings: Settings, folder: str) -> list[str]:
    return [name for name, refused in list_model_files(settings.models.models_dir, folder) if refused is None]


def vaes(settings: Settings) -> list[dict[str, Any]]:
    return [{"model_name": name, "filename": f"{VAE_DIR}/{name}"} for name in _loadable(settings, VAE_DIR)]


def _header_facts(path: Path) -> tuple[dict[str, Any], list[tuple[int, ...]]]:
    """A safetensors file's metadata and tensor shapes: from its header, or, for a model store file this machine
    does not hold, from the registry's record (metadata, and an embedding's shape)."""
    header = safetensors_header_or_none(path)
    if header is not None:
        return dict(header.metadata), list(header.shapes.values())
    record = record_at(path)
    if record is None:
        return {}, []
    shape = record.details.get("shape")
    return dict(record.metadata), [tuple(shape)] if shape else []


def loras(settings: Settings) -> list[dict[str, Any]]:
    found = []
    for name in _loadable(settings, LORA_DIR):
        stem = name.rsplit(".", 1)[0]
        metadata, _ = _header_facts(settings.models.models_dir / LORA_DIR / name)
        found.append({"name": stem, "alias": metadata.get("ss_output_name") or stem,
                      "path": f"{LORA_DIR}/{name}", "metadata": metadata})
    return found


def embeddings(settings: Settings) -> dict[str, dict[str, Any]]:
    """``loaded``/``skipped`` like the WebUI; shape and vector count come from the file header."""
    loaded: dict[str, Any] = {}
    for name in _loadable(settings, EMBEDDINGS_DIR):
        _, shapes = _header_facts(settings.models.models_dir / EMBEDDINGS_DIR / name)
        shape = shapes[0] if shapes and shapes[0] else [0]
        loaded[name.rsplit(".", 1)[0].rsplit("/", 1)[-1]] = {
            "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
            "shape": int(shape[-1]), "vectors": int(shape[0]) if len(shape) > 1 else 1,
        }
    skipped = {name.rsplit(".", 1)[0]: {"reason": refused}
               for name, refused in list_model_files(settings.models.models_dir, EMBEDDINGS_DIR) if refused}
    return {"loaded": loaded, "skipped": skipped}


def upscalers(settings: Settings) -> list[dict[str, Any]]:
    """``/sdapi/v1/upscalers``: the built-in None, Lanczos and Nearest, then the model files sorted by name, in the
    WebUI's shape (``scale`` a float, or null where the WebUI does not know it: a DAT file)."""
    found: list[dict[str, Any]] = [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
        for name in BUILTIN_UPSCALERS
    ]
    from api.model_catalog import upscaler_checks

    checks = upscaler_checks()
    for entry in scan_upscalers(settings.models.models_dir):
        check = checks.get(entry.location, {})
        if entry.loadable and "refused" not in check:
            scale = check.get("scale", entry.scale)
            found.append({"name": entry.name, "model_name": entry.model_name, "model_path": str(entry.path),
                          "model_url": None, "scale": float(scale) if scale is not None else None})
    return found


def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": name} for name in LATENT_UPSCALERS]
