"""What the models folder holds, with hashes and architectures, and the LoRAs a job names.

The farm's own list routes (``/v1/models``, ``/v1/loras``, ``/v1/vaes``, ``/v1/embeddings``) and
job submission read from here. Nothing is kept in memory between calls: every list is a fresh
scan of the folder, so a file copied in while the farm runs is visible at once (``POST
/v1/models/refresh`` has no scan cache to clear). What is expensive, the SHA-256 of a large file,
is remembered by :class:`~shared.webui.hashes.HashCache` per path, size and modification time.

Architecture detection (:func:`shared.models.architecture.checkpoint_architecture`, the worker's
detector too) reads only the safetensors JSON header: the API must stay torch-free, and a header is
all that is needed to tell SD1.5 from SDXL. A diffusers folder's architecture comes from its
``model_index.json`` (``StableDiffusionXLPipeline`` is SDXL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.sdapi.catalog import EMBEDDINGS_DIR, LORA_DIR
from shared import blocking
from shared.errors import FieldError
from shared.models.architecture import checkpoint_architecture
from shared.models.files import VAE_DIR, list_model_files, resolve_model_file
from shared.models.registry import scan_checkpoints
from shared.models.store_registry import active_view, record_at
from shared.webui.hashes import HashCache, legacy_model_hash
from shared.webui.prompts import extract_lora_tags

__all__ = [
    "CatalogEntry",
    "CheckpointEntry",
    "checkpoint_architecture",
    "list_checkpoints",
    "list_embeddings",
    "list_loras",
    "list_vaes",
    "refresh",
    "resolve_job_loras",
    "resolve_lora",
    "vae_hash",
]

Field = tuple[str | int, ...]


@dataclass(frozen=True)
class CatalogEntry:
    """One file of ``Lora/``, ``VAE/`` or ``embeddings/``; ``hash`` is None for a refused file (never hashed)."""

    name: str
    file: str
    size: int
    hash: str | None
    refused_reason: str | None


@dataclass(frozen=True)
class CheckpointEntry:
    """A checkpoint with the WebUI's 10-hex hash, its pre-2023 8-hex hash and the architecture from its header."""

    name: str
    file: str
    size: int
    hash: str | None
    sha256: str | None
    legacy_hash: str | None
    architecture: str | None
    refused_reason: str | None


def list_checkpoints(models_dir: Path, cache: HashCache) -> list[CheckpointEntry]:
    """Every checkpoint file and diffusers folder; refused pickles are listed with their reason and never
    opened. A folder's hash is :func:`shared.webui.hashes.sha256_folder`; it has no pre-2023 hash."""
    entries = []
    for ckpt in scan_checkpoints(models_dir):
        sha = cache.sha256(ckpt.path) if ckpt.loadable else None
        entries.append(CheckpointEntry(
            name=ckpt.name, file=ckpt.filename, size=ckpt.size, hash=sha[:10] if sha else None, sha256=sha,
            legacy_hash=legacy_model_hash(ckpt.path) if ckpt.loadable and not ckpt.is_folder else None,
            architecture=checkpoint_architecture(ckpt.path) if ckpt.loadable else None,
            refused_reason=ckpt.refused_reason,
        ))
    return entries


def _scan(models_dir: Path, folder: str, digest: Any) -> list[CatalogEntry]:
    entries = []
    for filename, refused in list_model_files(models_dir, folder):
        path = models_dir / folder / filename
        record = None if path.exists() else record_at(path)  # a model store file this folder does not hold
        entries.append(CatalogEntry(
            name=filename.rsplit(".", 1)[0], file=filename, size=record.size if record else path.stat().st_size,
            hash=None if refused else digest(path), refused_reason=refused,
        ))
    return entries


def list_loras(models_dir: Path, cache: HashCache) -> list[CatalogEntry]:
    """LoRAs with the WebUI's 12-hex short hash (the one written in "Lora hashes")."""
    return _scan(models_dir, LORA_DIR, cache.lora)


def list_vaes(models_dir: Path, cache: HashCache) -> list[CatalogEntry]:
    """VAEs with the 10-hex hash the WebUI writes as "VAE hash"."""
    return _scan(models_dir, VAE_DIR, cache.checkpoint)


def list_embeddings(models_dir: Path, cache: HashCache) -> list[CatalogEntry]:
    """Embeddings with the 12-hex SHA-256 prefix the WebUI writes in "TI hashes"."""
    return _scan(models_dir, EMBEDDINGS_DIR, lambda path: cache.sha256(path)[:12])


def refresh(models_dir: Path) -> dict[str, int]:
    """Rescan every folder, register its files in the model store's registry (when this process reads one), and
    count what is there (the folder's files and the store's).

    There is no scan cache to clear (every list reads the folder), so this only confirms what a
    client will now see; workers resolve files by name per job, so they need no restart either.
    """
    view = active_view()
    if view is not None and view.models_dir == Path(models_dir).resolve():
        from shared.db.session import get_session_factory
        from shared.models.store_files import register_folder

        register_folder(get_session_factory(), models_dir, None)
    return {
        "checkpoints": len(scan_checkpoints(models_dir)),
        "loras": len(list_model_files(models_dir, LORA_DIR)),
        "vaes": len(list_model_files(models_dir, VAE_DIR)),
        "embeddings": len(list_model_files(models_dir, EMBEDDINGS_DIR)),
    }


def resolve_lora(models_dir: Path, requested: str, field: Field) -> str:
    """The LoRA's file name inside ``Lora/``, by relative name, file name, or (as the WebUI) base name.

    Raises FieldError naming ``field`` for a name outside the folder, a refused pickle or an unknown
    LoRA (listing the available ones).
    """
    try:
        return resolve_model_file(models_dir, LORA_DIR, requested, field, "LoRA")
    except FieldError as exc:
        if not exc.message.startswith("unknown"):
            raise
        wanted = requested.strip()
        matches = [f for f, refused in list_model_files(models_dir, LORA_DIR)
                   if wanted in (f.rsplit("/", 1)[-1], f.rsplit("/", 1)[-1].rsplit(".", 1)[0])]
        if len(matches) != 1:
            raise
        return resolve_model_file(models_dir, LORA_DIR, matches[0], field, "LoRA")


def _tags(prompt: str, field: Field) -> list[tuple[str, float]]:
    try:
        _, tags = extract_lora_tags(prompt)
    except ValueError as exc:
        raise FieldError(field, str(exc)) from exc
    for name, weight in tags:
        if not math.isfinite(weight):
            raise FieldError(field, f"the weight {weight} of LoRA {name!r} is not a finite number")
    return tags


def resolve_job_loras(models_dir: Path, prompt: str, hr_prompt: str, requested: Sequence[tuple[str, float]],
                      cache: HashCache | None = None, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """The params' ``loras``: every LoRA of the prompt's tags, the hires prompt's and the ``loras`` field.

    Each is ``{"name", "weight", "file", "hash"}``, once per file in order of first mention, so a job
    records exactly which files (by 12-hex hash) it used. The tags stay in the prompt text (the
    WebUI keeps them in the infotext); the worker strips them before encoding. A LoRA given in the
    ``loras`` field with another weight than a prompt tag gives it is ambiguous: a 422.
    With ``skipped`` given, an unknown LoRA named by a prompt tag is left out and its name appended
    there instead of a 422 (what the WebUI's own API does: it warns and renders).
    """
    cache = cache or HashCache.of_models_dir(models_dir)
    chosen: dict[str, dict[str, Any]] = {}
    mentions: list[tuple[str, float, Field, Field]] = []
    for text, loc in ((prompt, ("body", "prompt")), (hr_prompt, ("body", "hr_prompt"))):
        mentions += [(name, weight, loc, loc) for name, weight in _tags(text, loc)]
    for i, (name, weight) in enumerate(requested):
        mentions.append((name, weight, ("body", "loras", i, "name"), ("body", "loras", i, "weight")))
    for name, weight, name_loc, weight_loc in mentions:
        try:
            file = resolve_lora(models_dir, name, name_loc)
        except FieldError:
            if skipped is None or name_loc[1] == "loras":
                raise
            skipped.append(name)
            continue
        if file in chosen:
            if name_loc[1] == "loras" and chosen[file]["weight"] != weight:
                raise FieldError(weight_loc, f"LoRA {name!r} has weight {chosen[file]['weight']} in the prompt "
                                             f"and {weight} here; give it once")
            continue
        chosen[file] = {"name": file.rsplit(".", 1)[0], "weight": weight, "file": file,
                        "hash": cache.lora(models_dir / LORA_DIR / file)}
    return list(chosen.values())


def vae_hash(models_dir: Path, vae_file: str | None, cache: HashCache | None = None) -> str | None:
    """The "VAE hash" (10 hex) of a resolved VAE file name; None for the checkpoint's own VAE."""
    if not vae_file:
        return None
    cache = cache or HashCache.of_models_dir(models_dir)
    return cache.checkpoint(models_dir / VAE_DIR / vae_file)





def upscaler_checks() -> dict[str, dict[str, Any]]:
    """What the live workers found in each upscaler file (architecture and scale, or why spandrel refuses it), from
    their heartbeats; empty when Redis cannot be read (submission then goes on: the worker still refuses a bad file,
    failing the job as the user's error)."""
    import redis

    from shared.models.upscalers import fleet_upscaler_checks
    from shared.queueing.fleet import get_redis, live_worker_infos

    blocking.check("reading the workers' upscaler checks")
    try:
        return fleet_upscaler_checks(live_worker_infos(get_redis()))
    except redis.RedisError:
        return {}


def resolve_hypernetworks(models_dir: Path, prompt: str) -> list[dict[str, Any]]:
    """The params' ``hypernetworks``: each ``<hypernet:name:multiplier>`` tag of the prompt, by its file in
    ``models/hypernetworks`` (or the model store), in order. Unknown names are a 422 naming the prompt."""
    from shared.models.files import HYPERNETWORK_DIR, list_hypernetworks
    from shared.models.store_registry import refresh_for
    from shared.webui.prompts import hypernet_tags

    try:
        tags = hypernet_tags(prompt)
    except ValueError as exc:
        raise FieldError(("body", "prompt"), str(exc)) from exc
    if not tags:
        return []
    known = list_hypernetworks(models_dir)
    if any(name not in known for name, _ in tags) and refresh_for(models_dir):
        known = list_hypernetworks(models_dir)
    found = []
    for name, multiplier in tags:
        if name not in known:
            raise FieldError(("body", "prompt"), f"unknown hypernetwork {name!r} in <hypernet:{name}>; installed: "
                                                 f"{', '.join(known) or 'none'}")
        file = known[name].relative_to(Path(models_dir) / HYPERNETWORK_DIR).as_posix()
        found.append({"name": name, "multiplier": multiplier, "file": file})
    return found
