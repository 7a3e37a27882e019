"""One settings object for API, worker and launcher, read from the environment.

Nothing connects at import time: callers reach settings through the cached
`get_settings()`, and tests clear the cache after changing the environment.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RENDERFARM_", extra="ignore")

    database_url: str = Field(
        "postgresql+psycopg://renderfarm@127.0.0.1:55432/renderfarm",
        validation_alias=AliasChoices("DATABASE_URL", "RENDERFARM_DATABASE_URL"),
    )
    redis_url: str = Field(
        "redis://127.0.0.1:56379/0", validation_alias=AliasChoices("REDIS_URL", "RENDERFARM_REDIS_URL")
    )
    storage_url: str = Field(
        "var/objects", validation_alias=AliasChoices("STORAGE_URL", "RENDERFARM_STORAGE_URL")
    )
    # Signs local-store URLs; `make up` generates one under ./var when unset.
    secret_key: str = "dev-insecure-secret-change-me"
    admin_key: str | None = None
    public_url: str = "http://127.0.0.1:7861"
    models_dir: Path = Path("models")
    default_model: str | None = None
    # Checkpoints a worker loads before it takes jobs (names, comma separated); empty = default model.
    worker_models: str = ""
    device: str = "auto"
    worker_name: str | None = None
    torch_threads: int = 0
    # The warm pipeline cache: bytes of model weights a worker keeps loaded (least recently used evicted);
    # 0 = automatic (85% of the GPU's memory, or half the RAM on a CPU worker). A count limit too (0 = none).
    pipeline_cache_bytes: int = 0
    pipeline_cache_models: int = 0

    # Routing by model affinity (shared/queueing/routing.py): jobs go to a worker holding their checkpoint warm,
    # but never wait longer than this for one before any worker may take them.
    affinity_routing: bool = True
    affinity_max_wait_seconds: float = 15.0

    # Limits on what a job may ask for.
    max_pixels: int = 2048 * 2048
    max_side: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_images_per_job: int = 32

    # Reliability.
    job_time_limit: int = 600
    lease_seconds: int = 60
    # A job whose worker is lost this many times fails with worker_lost instead of looping.
    max_attempts: int = 3
    # Queued jobs are re-published after this long when the broker holds fewer messages than queued jobs
    # (e.g. Redis restarted empty).
    republish_after_seconds: float = 30.0
    # How long a /sdapi/v1 txt2img/img2img call waits for its job; None: long enough for every retry.
    sdapi_timeout: float | None = None
    url_expires_seconds: int = 3600

    # Input images (img2img, masks, uploads, png-info). Checked on the header, before any pixel is decoded.
    max_input_pixels: int = 4096 * 4096
    max_upload_bytes: int = 32 * 1024 * 1024
    # Extra prompt styles in the WebUI's styles.csv format; unset: <models_dir>/styles.csv when present.
    styles_file: Path | None = None

    @property
    def broker_visibility_timeout(self) -> int:
        """Well above the hard time limit so Redis never redelivers a job that is still running."""
        return self.job_time_limit * 2 + 60

    def worker_model_names(self) -> list[str]:
        return [name.strip() for name in self.worker_models.split(",") if name.strip()]


def worker_process_name(settings: Settings, pid: int) -> str:
    """One name per render process: a lease names the exact process that holds it, and its heartbeat key is
    `renderfarm:workers:<name>`."""
    return f"{settings.worker_name or socket.gethostname()}:{pid}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
