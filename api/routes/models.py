"""What the farm can render with."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel
from shared.hashes import HashCache

from api.deps import CurrentKey, SettingsDep
from shared.model_registry import default_checkpoint, scan_checkpoints
from shared.samplers import SAMPLERS, SCHEDULE_TYPES

router = APIRouter(prefix="/v1", tags=["models"])


class ModelView(BaseModel):
    name: str
    title: str
    filename: str
    size: int
    hash: str | None
    sha256: str | None
    default: bool
    loadable: bool
    refused_reason: str | None


class SamplerView(BaseModel):
    name: str
    aliases: list[str]
    schedule_types: list[str]


def _hash_cache(settings) -> HashCache:
    return HashCache(settings.models_dir / ".hashes.json")


@router.get("/models", response_model=list[ModelView])
def list_models(key: CurrentKey, settings: SettingsDep) -> list[ModelView]:
    cache = _hash_cache(settings)
    default = default_checkpoint(settings.models_dir, settings.default_model)
    views = []
    for ckpt in scan_checkpoints(settings.models_dir):
        sha = cache.sha256(ckpt.path) if ckpt.loadable else None
        short = sha[:10] if sha else None
        views.append(
            ModelView(
                name=ckpt.name,
                title=f"{ckpt.filename} [{short}]" if short else ckpt.filename,
                filename=ckpt.filename,
                size=ckpt.size,
                hash=short,
                sha256=sha,
                default=ckpt.name == default,
                loadable=ckpt.loadable,
                refused_reason=ckpt.refused_reason,
            )
        )
    return views


@router.get("/samplers", response_model=list[SamplerView])
def list_samplers(key: CurrentKey) -> list[SamplerView]:
    return [SamplerView(name=s.name, aliases=list(s.aliases), schedule_types=list(s.schedules)) for s in SAMPLERS]


@router.get("/schedulers", response_model=list[str])
def list_schedulers(key: CurrentKey) -> list[str]:
    return list(SCHEDULE_TYPES)
