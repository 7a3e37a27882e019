"""What the farm can render with."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CurrentKey, SettingsDep
from api.model_catalog import list_checkpoints
from shared.models.registry import default_checkpoint
from shared.webui.hashes import HashCache
from shared.webui.samplers import SAMPLERS, SCHEDULE_TYPES

router = APIRouter(prefix="/v1", tags=["models"])


class ModelView(BaseModel):
    name: str
    title: str
    filename: str
    size: int
    hash: str | None
    sha256: str | None
    legacy_hash: str | None
    architecture: str | None
    default: bool
    loadable: bool
    refused_reason: str | None


class SamplerView(BaseModel):
    name: str
    aliases: list[str]
    schedule_types: list[str]


@router.get("/models", response_model=list[ModelView])
def list_models(key: CurrentKey, settings: SettingsDep) -> list[ModelView]:
    """Checkpoints with the WebUI's hashes (10-hex and pre-2023 8-hex) and the architecture from the header."""
    default = default_checkpoint(settings.models.models_dir, settings.models.default_model)
    return [
        ModelView(
            name=ckpt.name,
            title=f"{ckpt.file} [{ckpt.hash}]" if ckpt.hash else ckpt.file,
            filename=ckpt.file,
            size=ckpt.size,
            hash=ckpt.hash,
            sha256=ckpt.sha256,
            legacy_hash=ckpt.legacy_hash,
            architecture=ckpt.architecture,
            default=ckpt.name == default,
            loadable=ckpt.refused_reason is None,
            refused_reason=ckpt.refused_reason,
        )
        for ckpt in list_checkpoints(settings.models.models_dir, HashCache.of_models_dir(settings.models.models_dir))
    ]


@router.get("/samplers", response_model=list[SamplerView])
def list_samplers(key: CurrentKey) -> list[SamplerView]:
    return [SamplerView(name=s.name, aliases=list(s.aliases), schedule_types=list(s.schedules)) for s in SAMPLERS]


@router.get("/schedulers", response_model=list[str])
def list_schedulers(key: CurrentKey) -> list[str]:
    return list(SCHEDULE_TYPES)
