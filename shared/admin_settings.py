"""Settings of the admin dashboard, /metrics and pause (RENDERFARM_ prefix, like `shared.settings`).

Kept apart from the main `Settings` only so the dashboard could be built without editing it;
they can move there as they are.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class AdminSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RENDERFARM_", extra="ignore")

    sample_seconds: float = 10.0  # queue sample period of the API's sampler; 0 turns the sampler off
    sample_retention_hours: int = 48
    forget_lost_worker_seconds: int = 3600  # a lost worker stays on the page this long
    metrics_public: bool = False  # True: /metrics answers without an admin key (a private scrape network)
    # A render worker re-reads the pause flag this often by itself, so a broadcast it missed costs seconds.
    pause_poll_seconds: float = 5.0


@lru_cache
def get_admin_settings() -> AdminSettings:
    return AdminSettings()
