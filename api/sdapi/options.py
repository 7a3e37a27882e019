"""Per-API-key WebUI options: ``GET/POST /sdapi/v1/options`` without the WebUI's global state.

Four settings are kept, and they are only defaults for that key's later jobs: a job's own fields,
its ``override_settings`` and its ``infotext`` still win (see :mod:`api.sdapi.requests`). Other
keys that GET shows are read-only (POSTing them back unchanged is fine, as clients that round-trip
the whole dict do); anything else is refused by name rather than silently dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from api.sdapi.catalog import checkpoint_title, current_checkpoint, hash_cache
from api.submission.params import OVERRIDE_SETTINGS
from shared.db.sdapi_options import SdapiOptions
from shared.errors import FieldError
from shared.jobs.schemas import MAX_SEED
from shared.models.files import resolve_vae
from shared.models.registry import resolve_checkpoint
from shared.settings import Settings

__all__ = ["STORED_OPTIONS", "job_defaults", "options_view", "read_options", "update_options"]

log = logging.getLogger(__name__)

STORED_OPTIONS: tuple[str, ...] = tuple(OVERRIDE_SETTINGS)
_DEFAULTS: dict[str, Any] = {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0}
_READ_ONLY: dict[str, Any] = {"samples_format": "png", "sd_checkpoint_hash": None}


def read_options(session: Session, api_key_id: int) -> dict[str, Any]:
    """What this key has set (no defaults filled in)."""
    row = session.get(SdapiOptions, api_key_id)
    return dict(row.options) if row is not None else {}


def _int_option(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FieldError(("body", key), f"{key} must be an integer between {low} and {high}, got {value!r}")
    try:
        number = int(value)
    except ValueError as exc:
        raise FieldError(("body", key), f"{key} must be an integer between {low} and {high}, got {value!r}") from exc
    if not low <= number <= high or number != float(value):
        raise FieldError(("body", key), f"{key} must be an integer between {low} and {high}, got {value!r}")
    return number


def _checked(key: str, value: Any, settings: Settings) -> Any:
    """The value to store, in canonical form; FieldError naming the option when it is not valid."""
    if key == "sd_model_checkpoint":
        if not isinstance(value, str):
            raise FieldError(("body", key), "sd_model_checkpoint must be a checkpoint title or name (a string)")
        return resolve_checkpoint(settings.models.models_dir, value, ("body", key)).name
    if key == "sd_vae":
        if not isinstance(value, str):
            raise FieldError(("body", key), "sd_vae must be a file name in models/VAE, 'Automatic' or 'None'")
        resolved = resolve_vae(settings.models.models_dir, value, ("body", key))
        return resolved if resolved is not None else ("None" if value.strip().lower() == "none" else "Automatic")
    if key == "CLIP_stop_at_last_layers":
        return _int_option(key, value, 1, 12)
    if key == "renderfarm_batch_invariant":
        if not isinstance(value, bool):
            raise FieldError(("body", key), f"{key} must be true or false, got {value!r}")
        return value
    return _int_option(key, value, 0, MAX_SEED)


def options_view(stored: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The options GET shows: the key's values, the farm's defaults for the rest, and read-only facts."""
    chosen = {k: v for k, v in stored.items() if k != "sd_model_checkpoint"}
    view: dict[str, Any] = {**_DEFAULTS, **_READ_ONLY, **chosen}
    try:
        ckpt = current_checkpoint(settings, stored.get("sd_model_checkpoint"))
    except FieldError:  # the chosen checkpoint was removed since; show the farm's default instead
        ckpt = current_checkpoint(settings, None)
    cache = hash_cache(settings)
    view["sd_model_checkpoint"] = checkpoint_title(ckpt, cache) if ckpt is not None else None
    view["sd_checkpoint_hash"] = cache.sha256(ckpt.path) if ckpt is not None else None
    return view


def update_options(session: Session, api_key_id: int, changes: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Store the key's new defaults; every value is checked first, so a bad one changes nothing."""
    current = read_options(session, api_key_id)
    view = options_view(current, settings)
    unknown = [k for k in changes if k not in STORED_OPTIONS and k not in _READ_ONLY]
    if unknown:
        raise FieldError(("body", unknown[0]), f"unsupported option(s) {', '.join(map(repr, unknown))}; "
                                               f"options that can be set: {', '.join(STORED_OPTIONS)}")
    updated = dict(current)
    for key, value in changes.items():
        if key in _READ_ONLY:
            if value != view[key]:
                raise FieldError(("body", key), f"{key} is read-only here (it is {view[key]!r})")
            continue
        updated[key] = _checked(key, value, settings)
    row = session.get(SdapiOptions, api_key_id)
    if row is None:
        session.add(SdapiOptions(api_key_id=api_key_id, options=updated))
    else:
        row.options = updated
    session.flush()
    return updated


def job_defaults(stored: dict[str, Any], settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """The key's options as farm request fields (``model``, ``vae``, ``clip_skip``, ``eta_noise_seed_delta``), and
    warnings. A stored checkpoint or VAE that was removed (or is refused now) is left out, as a WebUI falls back to
    what it has: the call renders with the farm's default and says so, instead of every later call being a 422."""
    defaults: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in stored.items():
        if key not in OVERRIDE_SETTINGS:
            continue
        try:
            if key == "sd_model_checkpoint":
                resolve_checkpoint(settings.models.models_dir, str(value), ("body", key))
            elif key == "sd_vae":
                resolve_vae(settings.models.models_dir, str(value), ("body", key))
        except FieldError as exc:
            warnings.append(f"this key's option {key}={value!r} is no longer usable ({exc.message}); the farm's "
                            "default was used")
            log.warning("API key option %s=%r is stale (%s); using the farm's default", key, value, exc.message)
            continue
        defaults[OVERRIDE_SETTINGS[key]] = value
    return defaults, warnings
