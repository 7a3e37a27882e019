"""LoRAs, VAEs, embeddings and upscalers the farm can use, and the admin's rescan of the models folder.

The lists are fresh scans (see :mod:`api.model_catalog`), so a file added while the farm runs
shows up without a restart; hashes come from the shared on-disk cache.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import AdminKey, CurrentKey, SettingsDep
from api.model_catalog import (
    CatalogEntry,
    list_embeddings,
    list_loras,
    list_vaes,
    refresh,
    upscaler_checks,
)
from shared.models.upscalers import BUILTIN_UPSCALERS, LATENT_UPSCALERS, scan_upscalers
from shared.webui.hashes import HashCache

router = APIRouter(prefix="/v1", tags=["models"])


class FileView(BaseModel):
    name: str
    file: str
    size: int
    hash: str | None
    refused_reason: str | None


class RefreshView(BaseModel):
    checkpoints: int
    loras: int
    vaes: int
    embeddings: int


def _views(entries: list[CatalogEntry]) -> list[FileView]:
    return [FileView(name=e.name, file=e.file, size=e.size, hash=e.hash, refused_reason=e.refused_reason)
            for e in entries]


@router.get("/loras", response_model=list[FileView])
def get_loras(key: CurrentKey, settings: SettingsDep) -> list[FileView]:
    """``hash`` is the WebUI's 12-hex LoRA short hash."""
    return _views(list_loras(settings.models.models_dir, HashCache.of_models_dir(settings.models.models_dir)))


@router.get("/vaes", response_model=list[FileView])
def get_vaes(key: CurrentKey, settings: SettingsDep) -> list[FileView]:
    """``hash`` is the 10-hex "VAE hash"."""
    return _views(list_vaes(settings.models.models_dir, HashCache.of_models_dir(settings.models.models_dir)))


@router.get("/embeddings", response_model=list[FileView])
def get_embeddings(key: CurrentKey, settings: SettingsDep) -> list[FileView]:
    """``hash`` is the 12-hex SHA-256 prefix of "TI hashes"."""
    return _views(list_embeddings(settings.models.models_dir, HashCache.of_models_dir(settings.models.models_dir)))


@router.get("/hypernetworks", response_model=list[FileView])
def get_hypernetworks(key: CurrentKey, settings: SettingsDep) -> list[FileView]:
    """Hypernetworks a prompt may name with ``<hypernet:name:multiplier>`` (``models/hypernetworks``, and the model
    store's); ``hash`` is the WebUI's 10-hex short hash (of the model store's record for a file not here)."""
    from shared.models.files import HYPERNETWORK_DIR, list_hypernetworks
    from shared.models.store_registry import record_at

    models_dir = settings.models.models_dir
    cache = HashCache.of_models_dir(models_dir)
    views = []
    for name, path in list_hypernetworks(models_dir).items():
        record = None if path.exists() else record_at(path)  # the cache reads a missing file's hash from it too
        views.append(FileView(name=name, file=path.relative_to(models_dir / HYPERNETWORK_DIR).as_posix(),
                              size=record.size if record is not None else path.stat().st_size,
                              hash=cache.sha256(path)[:10], refused_reason=None))
    return views


@router.post("/models/refresh", response_model=RefreshView)
def refresh_models(key: AdminKey, settings: SettingsDep) -> RefreshView:
    """Admin only: rescan the models folder; what a client will now see, counted per folder."""
    return RefreshView(**refresh(settings.models.models_dir))


class UpscalerView(BaseModel):
    name: str = Field(description="the WebUI's name: what hr_upscaler, upscaler_1 and upscaler_2 take")
    kind: Literal["latent", "builtin", "model"]
    file: str | None = Field(description="a model's file, relative to the models folder")
    architecture: str | None = Field(None, description="the network a worker's spandrel found (null: not checked "
                                                       "yet, or a built-in)")
    scale: int | None
    size: int | None
    refused_reason: str | None


@router.get("/upscalers", response_model=list[UpscalerView])
def get_upscalers(key: CurrentKey, settings: SettingsDep) -> list[UpscalerView]:
    """Every upscaler a job may name, as the WebUI lists them: hires fix's latent modes, the built-in None, Lanczos
    and Nearest, then the model files in ``ESRGAN/``, ``RealESRGAN/``, ``SwinIR/``, ``DAT/``, ``HAT/``, ``ScuNET/``
    (refused ones with the reason: the gateway's own check of the file, or a worker's spandrel; latent modes only
    serve hires fix)."""
    views = [UpscalerView(name=name, kind="latent", file=None, scale=None, size=None, refused_reason=None)
             for name in LATENT_UPSCALERS]
    views += [UpscalerView(name=name, kind="builtin", file=None, scale=None, size=None, refused_reason=None)
              for name in BUILTIN_UPSCALERS]
    checks = upscaler_checks()
    for entry in scan_upscalers(settings.models.models_dir):
        check = checks.get(entry.location, {})
        views.append(UpscalerView(
            name=entry.name, kind="model", file=entry.location, architecture=check.get("architecture"),
            scale=check.get("scale", entry.scale), size=entry.size,
            refused_reason=entry.refused_reason or check.get("refused")))
    return views
