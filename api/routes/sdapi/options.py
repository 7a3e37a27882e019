"""``GET/POST /sdapi/v1/options``: per API key, never global (see :mod:`api.sdapi.options`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body

from api.deps import SessionDep, SettingsDep
from api.sdapi.auth import SdapiKey
from api.sdapi.options import options_view, read_options, update_options
from shared.jobs.schemas import MAX_SEED

router = APIRouter()


@router.get("/options")
def get_options(key: SdapiKey, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    return options_view(read_options(session, key.id), settings)


_OPTIONS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False,
    "description": "this key's job defaults; GET's read-only keys may be sent back unchanged",
    "properties": {
        "sd_model_checkpoint": {"type": "string", "description": "a checkpoint title or name"},
        "sd_vae": {"type": "string", "description": "a file in models/VAE, 'Automatic' or 'None'"},
        "CLIP_stop_at_last_layers": {"type": "integer", "minimum": 1, "maximum": 12},
        "eta_noise_seed_delta": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "renderfarm_batch_invariant": {"type": "boolean"},
        "samples_format": {"type": "string", "enum": ["png"], "description": "read-only"},
        "sd_checkpoint_hash": {"type": ["string", "null"], "description": "read-only"},
    }}}}}}


@router.post("/options", openapi_extra=_OPTIONS_BODY)
def set_options(key: SdapiKey, session: SessionDep, settings: SettingsDep,
                changes: dict[str, Any] = Body(...)) -> None:
    """sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers, eta_noise_seed_delta: this key's job defaults."""
    update_options(session, key.id, changes, settings)
    session.commit()
