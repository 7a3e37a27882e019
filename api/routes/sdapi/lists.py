"""The WebUI's list routes (models, samplers, VAEs, LoRAs, ...), read from the farm's models folder.

``refresh-*`` rescan the folder for an admin key (the gateway lists the folder on every call, so there is no
cache to rebuild; workers load what a job names when it runs) and are a 403 for other keys, as
``POST /v1/models/refresh`` is. ``cmd-flags`` shows server folder paths, and ``memory`` the host's RAM, to admin
keys only; other keys get the flags WebUI clients read (``api``, ``nowebui``, limits) without them.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, HTTPException, status
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep
from api.model_catalog import refresh
from api.sdapi import catalog
from api.sdapi.auth import SdapiKey
from shared.models.files import ESRGAN_DIR, VAE_DIR
from shared.models.registry import CHECKPOINT_DIR
from shared.webui.samplers import SAMPLERS, SCHEDULE_TYPES
from shared.webui.styles import load_style_book

router = APIRouter()


@router.get("/sd-models")
async def sd_models(key: SdapiKey, settings: SettingsDep) -> list[dict[str, Any]]:
    """Titles carry the 10-digit hash of the whole file (computed once, then cached), like the WebUI's."""
    return await run_in_threadpool(catalog.sd_models, settings)


@router.get("/samplers")
def samplers(key: SdapiKey) -> list[dict[str, Any]]:
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]


@router.get("/schedulers")
def schedulers(key: SdapiKey) -> list[dict[str, Any]]:
    return [{"name": name.lower(), "label": name, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name in SCHEDULE_TYPES]


@router.get("/upscalers")
def upscalers(key: SdapiKey, settings: SettingsDep) -> list[dict[str, Any]]:
    return catalog.upscalers(settings)


@router.get("/latent-upscale-modes")
def latent_upscale_modes(key: SdapiKey) -> list[dict[str, str]]:
    return catalog.latent_upscale_modes()


@router.get("/sd-vae")
def sd_vae(key: SdapiKey, settings: SettingsDep) -> list[dict[str, Any]]:
    return catalog.vaes(settings)


@router.get("/loras")
def loras(key: SdapiKey, settings: SettingsDep) -> list[dict[str, Any]]:
    """Installed LoRA files. Jobs accept ``<lora:name:weight>`` tags; applying them is issue 4."""
    return catalog.loras(settings)


@router.get("/embeddings")
def embeddings(key: SdapiKey, settings: SettingsDep) -> dict[str, dict[str, Any]]:
    return catalog.embeddings(settings)


@router.get("/prompt-styles")
def prompt_styles(key: SdapiKey, settings: SettingsDep) -> list[dict[str, str]]:
    book = load_style_book(settings)
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in book.styles.values()]


@router.get("/scripts")
def scripts(key: SdapiKey) -> dict[str, list[str]]:
    """No WebUI scripts or extensions run here; clients use this list to decide what to send."""
    return {"txt2img": [], "img2img": []}


@router.get("/script-info")
def script_info(key: SdapiKey) -> list[dict[str, Any]]:
    return []


@router.get("/face-restorers")
def face_restorers(key: SdapiKey) -> list[dict[str, Any]]:
    return []


@router.get("/hypernetworks")
def hypernetworks(key: SdapiKey, settings: SettingsDep) -> list[dict[str, Any]]:
    """The hypernetworks in the models folder and the model store, as the WebUI lists them (``name``, ``path``)."""
    from shared.models.files import list_hypernetworks

    return [{"name": name, "path": str(path)} for name, path in list_hypernetworks(settings.models.models_dir).items()]


@router.get("/cmd-flags")
def cmd_flags(key: SdapiKey, settings: SettingsDep) -> dict[str, Any]:
    """The WebUI flags that describe this server; it runs API-only, with keys as auth, across a farm. Server
    paths only for admin keys (None for others, as the WebUI shows an unset path)."""
    models = settings.models.models_dir
    paths: dict[str, Any] = {
        "data_dir": str(models.parent), "models_dir": str(models),
        "ckpt_dir": str(models / CHECKPOINT_DIR), "vae_dir": str(models / VAE_DIR),
        "lora_dir": str(models / catalog.LORA_DIR), "embeddings_dir": str(models / catalog.EMBEDDINGS_DIR),
        "esrgan_models_path": str(models / ESRGAN_DIR), "styles_file": [str(settings.models.styles_file or "")],
    }
    if not key.is_admin:
        paths = {name: None for name in paths}
    return {
        "api": True, "nowebui": True, "api_auth": "API keys", "listen": True, "skip_torch_cuda_test": True,
        **paths, "max_pixels": settings.limits.max_pixels, "max_steps": settings.limits.max_steps,
    }


def _ram() -> dict[str, int]:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return {"free": 0, "used": 0, "total": 0}
    return {"free": free, "used": total - free, "total": total}


@router.get("/memory")
def memory(key: SdapiKey) -> dict[str, Any]:
    """The gateway's RAM (admin keys; others get the WebUI's error shape); GPU memory lives on the workers."""
    ram: dict[str, Any] = _ram() if key.is_admin else {"error": "host memory is shown to admin keys only"}
    return {"ram": ram, "cuda": {"error": "the API gateway has no GPU; each worker reports its own on /admin"}}


def refresh_folders(key: SdapiKey, settings: SettingsDep) -> None:
    """Admin keys: rescan the models folder (the farm lists it on every call anyway); other keys: 403."""
    if not key.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="refreshing the models folder needs an admin key; "
                                                              "the farm lists the folder on every call anyway")
    refresh(settings.models.models_dir)


for _folder in ("checkpoints", "loras", "vae", "embeddings"):
    router.add_api_route(f"/refresh-{_folder}", refresh_folders, methods=["POST"], name=f"refresh_{_folder}",
                         responses={403: {"description": "not an admin key"}})
