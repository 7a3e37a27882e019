"""One settings object for API, worker, webhook sender and launcher, read from the environment.

`Settings` is a tree of groups (`settings.services.database_url`, `settings.jobs.lease_seconds`,
`settings.webhooks.retry_schedule`, ...). Each group is its own pydantic-settings class, so every
environment variable keeps its flat name: `RENDERFARM_` + the field name (`RENDERFARM_LEASE_SECONDS`),
`RENDERFARM_WEBHOOK_` + the field name for the webhook group, plus the few names set by other tools
(`DATABASE_URL`, `REDIS_URL`, `STORAGE_URL`) and `RENDERFARM_WEBHOOK_REDISPATCH_SECONDS`.

Nothing connects at import time: callers reach settings through the cached `get_settings()`, so a process
reads its environment once, when it first asks. Tests that change the environment in-process call
`get_settings.cache_clear()`; tests build a `Settings(models=ModelSettings(models_dir=...))` by hand.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_FLAT = SettingsConfigDict(env_prefix="RENDERFARM_", extra="ignore", frozen=True)


class ServiceSettings(BaseSettings):
    """Where the backing services are (Postgres, Redis, the object store) and how stored files are served."""

    model_config = SettingsConfigDict(**_FLAT, populate_by_name=True)

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
    # Database connections each process keeps open for reuse, and how many more it may open in a burst (closed
    # again when returned). A pool smaller than the requests a process serves at once makes every burst open and
    # close connections: with 5 kept, 16 concurrent polls cost PostgreSQL six times the CPU of the poll's own
    # query (issue 20). Every process's pool_size + max_overflow together must fit PostgreSQL's max_connections.
    db_pool_size: int = Field(16, ge=1, le=1000)
    db_max_overflow: int = Field(16, ge=0, le=1000)
    # Signs local-store URLs; `make up` generates one under ./var when unset.
    secret_key: str = "dev-insecure-secret-change-me"
    public_url: str = "http://127.0.0.1:7861"
    url_expires_seconds: int = 3600


class ModelSettings(BaseSettings):
    """The WebUI-style models folder and what a job uses when it names no checkpoint."""

    model_config = _FLAT

    models_dir: Path = Path("models")
    default_model: str | None = None
    # Extra prompt styles in the WebUI's styles.csv format; unset: <models_dir>/styles.csv when present.
    styles_file: Path | None = None
    # A model upscaler's pass is tiled (the WebUI's ESRGAN_tile and ESRGAN_tile_overlap; 0: one whole-image pass).
    upscaler_tile: int = Field(192, ge=0, le=2048)
    upscaler_tile_overlap: int = Field(8, ge=0, le=256)
    # The shared model store (issue 19): the registry in Postgres is listed beside the folder, uploads go to the
    # object store, and workers pull what a job needs that their folder lacks.
    model_store: bool = True
    # Bytes of pulled model files a worker keeps in its models folder (least recently used go first; 0: no limit).
    model_disk_cache_bytes: int = Field(0, ge=0)
    # A cap on one worker's pull bandwidth in bytes per second (0: none), so pulls leave room on a shared link.
    model_pull_bytes_per_second: int = Field(0, ge=0)
    # Tries of one file's pull (store down, hash mismatch) before the job fails naming the file.
    model_pull_tries: int = Field(3, ge=1, le=20)
    # Largest file POST /v1/models takes (and POST /v1/models/import downloads).
    model_upload_max_bytes: int = Field(64 * 1024**3, ge=1)
    # Hosts, addresses or CIDR networks POST /v1/models/import may fetch from although they are not public
    # (a store inside the operator's network); every other URL must resolve to public addresses only.
    model_import_allow_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # How long an import may wait for the next bytes from its URL.
    model_import_timeout_seconds: float = Field(60.0, gt=0)

    @field_validator("model_import_allow_hosts", mode="before")
    @classmethod
    def _import_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value


class WorkerSettings(BaseSettings):
    """One render worker: its name, device, the checkpoints it warms and how many it keeps loaded."""

    model_config = _FLAT

    worker_name: str | None = None
    # Checkpoints a worker loads before it takes jobs (names, comma separated); empty = default model.
    worker_models: str = ""
    device: str = "auto"
    torch_threads: int = 0
    # The warm pipeline cache: bytes of model weights a worker keeps loaded (least recently used evicted);
    # 0 = automatic (85% of the GPU's memory, or half the RAM on a CPU worker). A count limit too (0 = none).
    pipeline_cache_bytes: int = 0
    pipeline_cache_models: int = 0

    def worker_model_names(self) -> list[str]:
        return [name.strip() for name in self.worker_models.split(",") if name.strip()]


class LimitSettings(BaseSettings):
    """Limits on what a job may ask for, checked by the API before anything is enqueued."""

    model_config = _FLAT

    max_pixels: int = 2048 * 2048
    max_side: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_images_per_job: int = 32
    # Input images (img2img, masks, uploads, png-info). Checked on the header, before any pixel is decoded.
    max_input_pixels: int = 4096 * 4096
    max_upload_bytes: int = 32 * 1024 * 1024
    # Upscale jobs (Extras): the largest output they may make.
    max_upscale_pixels: int = 8192 * 8192
    # Training datasets (POST /v1/datasets): the request, the images in it, what its zip unpacks to, and the
    # compression ratio past which a zip entry is taken for a zip bomb. Images also obey max_input_pixels.
    dataset_max_upload_bytes: int = Field(2 * 1024**3, ge=1)
    dataset_max_images: int = Field(5000, ge=1)
    dataset_max_unpacked_bytes: int = Field(4 * 1024**3, ge=1)
    dataset_max_compression_ratio: float = Field(100.0, gt=1)


class JobSettings(BaseSettings):
    """Reliability of a job's run: time limit, leases, attempts, re-publishing, how long the WebUI API waits."""

    model_config = _FLAT

    job_time_limit: int = 600
    lease_seconds: int = 60
    # A job whose worker is lost this many times fails with worker_lost instead of looping.
    max_attempts: int = 3
    # Queued jobs are re-published after this long when the broker holds fewer messages than queued jobs
    # (e.g. Redis restarted empty).
    republish_after_seconds: float = 30.0
    # How long a /sdapi/v1 txt2img/img2img call waits for its job; None: long enough for every retry.
    sdapi_timeout: float | None = None

    @property
    def broker_visibility_timeout(self) -> int:
        """Well above the hard time limit so Redis never redelivers a job that is still running."""
        return self.job_time_limit * 2 + 60

    @property
    def render_time_limit(self) -> int:
        """When a job is stopped and fails as `timeout` (at its next denoising step, or by Celery's soft time
        limit elsewhere): 30 s before the hard limit (`job_time_limit`, which kills the process and leaves the
        job to lease expiry), or a quarter of it for limits under two minutes."""
        return max(self.job_time_limit - 30, self.job_time_limit * 3 // 4)


class RoutingSettings(BaseSettings):
    """Routing by model affinity (shared/queueing/routing.py): jobs go to a worker holding their checkpoint
    warm, but never wait longer than `affinity_max_wait_seconds` for one before any worker may take them."""

    model_config = _FLAT

    affinity_routing: bool = True
    affinity_max_wait_seconds: float = 15.0


class FairShareSettings(BaseSettings):
    """Sharing the fleet between owners (issue 17; README "Many users, one fleet"). Per-owner values set by an
    admin (`owner_policies`) override these defaults; 0 means "no cap" wherever a cap is meant."""

    model_config = _FLAT

    # Claims pick the owner with the least recent render time per unit of weight (off: oldest job first).
    fair_share: bool = True
    # Recent render time decays with this half-life: what an owner used an hour ago barely counts now.
    fair_share_half_life_seconds: float = Field(600.0, gt=0, le=86400 * 7)
    default_weight: float = Field(1.0, gt=0, le=1_000_000)
    default_max_running: int = Field(0, ge=0)
    # The priority range of a job; an owner may ask up to its max_priority (default below), never above.
    min_priority: int = Field(-100, le=0)
    max_priority_limit: int = Field(100, ge=0)
    default_max_priority: int = Field(0)
    default_max_queued: int = Field(10_000, ge=0)
    # Job creation per owner (token bucket in Redis): a person never reaches it by hand, a runaway script does.
    rate_limit: bool = True
    default_rate_burst: int = Field(60, ge=1)
    default_rate_per_second: float = Field(10.0, gt=0)
    # Quotas per UTC day and month (0: none).
    default_gpu_seconds_per_day: float = Field(0.0, ge=0)
    default_gpu_seconds_per_month: float = Field(0.0, ge=0)
    default_images_per_day: int = Field(0, ge=0)
    default_images_per_month: int = Field(0, ge=0)


class BatchingSettings(BaseSettings):
    """Micro-batching (docs/architecture.md, "Batches"): a worker's claim takes queued jobs with the same
    batch key along with the one its message named, and the engine denoises their images together."""

    model_config = _FLAT

    batching: bool = True  # off: one job per claim (a job's own batch_size images are still one batch)
    # How long a claim waits for more partners when the batch has room (0: take what is already queued).
    batch_window_ms: int = Field(0, ge=0, le=10_000)
    # Images per UNet call; 0: the worker decides (from free GPU memory on CUDA, a small number on CPU).
    max_batch_images: int = Field(0, ge=0, le=256)
    # Pixels (images x width x height) per UNet call, so a batch of large images fits; 0: the worker decides.
    batch_pixel_budget: int = Field(0, ge=0)


class TrainingSettings(BaseSettings):
    """Training jobs (issue 15): embeddings and hypernetworks trained on the `train` queue. A worker takes them
    only when its Celery consumer follows that queue (`-Q render,train`, or `-Q train` for a training-only worker)."""

    model_config = _FLAT

    # A training is stopped (failed as `timeout`, its last checkpoint kept) after this long on one attempt.
    training_time_limit: int = Field(6 * 3600, ge=60)
    training_max_steps: int = Field(100_000, ge=1)
    # The largest training_width / training_height (and preview) side in pixels.
    training_max_side: int = Field(1024, ge=64)
    # A running training's step, loss and ETA are written at most this often.
    training_progress_seconds: float = Field(2.0, ge=0.1, le=60)


class AdminSettings(BaseSettings):
    """The admin dashboard, /metrics and pause."""

    model_config = _FLAT

    # Created as an admin API key when the API starts.
    admin_key: str | None = None
    sample_seconds: float = 10.0  # queue sample period of the API's sampler; 0 turns the sampler off
    sample_retention_hours: int = 48
    forget_lost_worker_seconds: int = 3600  # a lost worker stays on the page this long
    metrics_public: bool = False  # True: /metrics answers without an admin key (a private scrape network)
    # A render worker re-reads the pause flag this often by itself, so a broadcast it missed costs seconds.
    pause_poll_seconds: float = 5.0


class GatewaySettings(BaseSettings):
    """The API gateway's processes and what it keeps in memory between requests (README: "How cheap a poll is")."""

    model_config = _FLAT

    # uvicorn worker processes for the API (`make up`, docker-compose); 0: one per CPU core.
    api_workers: int = Field(0, ge=0, le=256)
    # An API key is looked up in Postgres at most this often per process; a revoked key is refused within it.
    api_key_cache_seconds: float = Field(5.0, ge=0, le=60)
    # The longest `GET /v1/jobs/{id}?wait=N` may hold a request.
    long_poll_max_seconds: float = Field(60.0, ge=0, le=600)
    # Queue positions come from a snapshot of the queued jobs refreshed at most this often per process (less often
    # where one read of a long queue takes more than 2% of it: `shared.jobs.views.READ_SHARE`).
    queue_position_refresh_seconds: float = Field(1.0, ge=0, le=60)
    # Celery's `task-sent` monitoring event on every submit (for Flower's "pending" list). Off: it was an eighth of
    # a POST's cost, and the farm's own queue state is in Postgres (`/metrics`, the admin dashboard).
    task_sent_events: bool = False

    def api_worker_count(self) -> int:
        """The configured process count, or one per core."""
        return self.api_workers or max(1, os.cpu_count() or 1)


# Roughly exponential, about 2.8 days in all: 5s 30s 2m 10m 30m 1h 2h 4h 8h 12h 16h 24h.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (
    5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200, 57600, 86400,
)
_WEBHOOK_PREFIX = "RENDERFARM_WEBHOOK_"


class WebhookSettings(BaseSettings):
    """Webhook delivery: retries, timeouts, throttling of progress events, the SSRF allowlist.

    Every variable is optional; an empty one means its default. Seconds are never negative.
    """

    model_config = SettingsConfigDict(env_prefix=_WEBHOOK_PREFIX, extra="ignore", frozen=True, populate_by_name=True)

    # Delay before retry n (after the n-th failed attempt); its length is the number of retries.
    retry_schedule: Annotated[tuple[float, ...], NoDecode] = DEFAULT_RETRY_SCHEDULE
    # Each delay is drawn from [d * (1 - jitter), d * (1 + jitter)] so failed receivers are not hit in waves.
    jitter: float = 0.2
    timeout_seconds: float = 15.0
    # At most one `progress` event per job in this window.
    progress_interval_seconds: float = 0.5
    # How often the webhook worker looks for due deliveries.
    poll_seconds: float = 1.0
    # A delivery whose broker message was lost is dispatched again by the poller after this long.
    redispatch_after_seconds: float = Field(10.0, validation_alias=_WEBHOOK_PREFIX + "REDISPATCH_SECONDS")
    # A `Retry-After` longer than this is cut down to it.
    max_retry_after_seconds: float = 86400.0
    # Finished deliveries are kept this long for the listing (finished progress events: one day).
    keep_days: float = 30.0
    # Hosts, addresses or CIDR networks exempt from the SSRF address check (local testing only).
    allow_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # When set, the only hosts, addresses or CIDR networks webhooks may target (an operator's allow-list; also
    # what keeps a fuzz run's traffic on a loopback sink). Empty: any public address.
    only_hosts: Annotated[tuple[str, ...], NoDecode] = ()

    @property
    def lease_seconds(self) -> float:
        """How long an attempt may hold its delivery before another worker may try it again."""
        return self.timeout_seconds * 2 + 30

    @classmethod
    def _env_name(cls, field: str) -> str:
        alias = cls.model_fields[field].validation_alias
        return alias if isinstance(alias, str) else _WEBHOOK_PREFIX + field.upper()

    @field_validator("jitter", "timeout_seconds", "progress_interval_seconds", "poll_seconds",
                     "redispatch_after_seconds", "max_retry_after_seconds", "keep_days", mode="before")
    @classmethod
    def _seconds(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        name, raw = cls._env_name(info.field_name), value
        if isinstance(value, str):
            if not value.strip():
                return cls.model_fields[info.field_name].default
            try:
                value = float(value.strip())
            except ValueError as exc:
                raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from exc
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"{name} must not be negative, got {raw!r}")
        return value

    @field_validator("jitter")
    @classmethod
    def _at_most_one(cls, value: float) -> float:
        return min(value, 1.0)

    @field_validator("poll_seconds")
    @classmethod
    def _not_busy(cls, value: float) -> float:
        return max(value, 0.05)

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        name, raw = cls._env_name("retry_schedule"), value
        if isinstance(value, str):
            if not value.strip():
                return DEFAULT_RETRY_SCHEDULE
            try:
                value = tuple(float(part) for part in value.strip().split(",") if part.strip())
            except ValueError as exc:
                raise ValueError(f"{name} must be comma-separated seconds like '5,30,120', got {raw!r}") from exc
        if any(isinstance(d, int | float) and d < 0 for d in value):
            raise ValueError(f"{name} must not contain negative delays, got {raw!r}")
        return value

    @field_validator("allow_hosts", "only_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value


class Settings(BaseModel):
    """Everything a process is configured with, one group per concern; each group reads its variables."""

    model_config = ConfigDict(frozen=True)

    services: ServiceSettings = Field(default_factory=ServiceSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    fair_share: FairShareSettings = Field(default_factory=FairShareSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)


def worker_process_name(settings: Settings, pid: int) -> str:
    """One name per render process: a lease names the exact process that holds it, and its heartbeat key is
    `renderfarm:workers:<name>`."""
    return f"{settings.worker.worker_name or socket.gethostname()}:{pid}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
