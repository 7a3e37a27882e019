"""``GET/POST /sdapi/v1/options``: per API key, never global (see :mod:`api.sdapi.options`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body

from api.deps import SessionDep, SettingsDep
from api.sdapi.auth import SdapiKey
from api.sdapi.options import options_view, read_options, update_options

router = APIRouter()


@router.get("/options")
def get_options(key: SdapiKey, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    return options_view(read_options(session, key.id), settings)


@router.post("/options")
def set_options(key: SdapiKey, session: SessionDep, settings: SettingsDep,
                changes: dict[str, Any] = Body(...)) -> None:
    """sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers, eta_noise_seed_delta: this key's job defaults."""
    update_options(session, key.id, changes, settings)
    session.commit()
