"""The JSON the admin dashboard reads; typed so that OpenAPI documents every field."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.jobs.schemas import ErrorView, JobView


class ModelDepth(BaseModel):
    model: str
    queued: int
    running: int
    oldest_queued_at: datetime | None


class DatabaseDepth(BaseModel):
    """Jobs by their rows in Postgres: the truth."""

    queued: int
    running: int
    oldest_queued_at: datetime | None
    oldest_queued_age_seconds: float | None
    by_model: list[ModelDepth]


class BrokerDepth(BaseModel):
    """Messages in Redis. May differ from the rows: a re-published job has two messages, a lost one none."""

    queue: str
    waiting: int | None = Field(description="messages no worker has taken yet")
    unacked: int | None = Field(description="messages delivered and not yet acknowledged, all queues")
    error: str | None = None


class PauseView(BaseModel):
    paused: bool
    paused_at: datetime | None
    paused_by: str | None


class PauseResult(PauseView):
    workers_notified: list[str] = Field(description="Celery workers that acknowledged the change within a second")


class QueueView(BaseModel):
    pause: PauseView
    database: DatabaseDepth
    broker: BrokerDepth
    checked_at: datetime


class CurrentJob(BaseModel):
    id: uuid.UUID
    owner: str | None
    model: str | None
    progress: float | None
    started_at: datetime | None


class WorkerView(BaseModel):
    name: str
    state: Literal["starting", "idle", "busy", "lost"]
    pid: int | None
    device: str | None
    memory: dict[str, Any] | None = Field(description="as the worker reports it, when it does")
    models: list[str]
    loras: list[str]
    controlnets: list[str] = Field(default_factory=list, description="ControlNets held, by title")
    upscalers: list[str] = Field(default_factory=list, description="upscaler models held, by file")
    current_job: CurrentJob | None
    jobs_done: int
    images_done: int = 0
    images_per_second: float | None = Field(None, description="images recorded per second of rendering")
    batch_jobs: int = Field(0, description="jobs in the batch it renders now")
    model_loads: int | None
    heartbeat_at: datetime | None
    heartbeat_age_seconds: float


class FleetView(BaseModel):
    workers: list[WorkerView]
    alive: int
    lost: int
    lost_after_seconds: float
    error: str | None = None


class ThroughputSeries(BaseModel):
    """Finished work per bucket, from the rows' own timestamps (exact, survives any restart)."""

    bucket_seconds: int
    t: list[int] = Field(description="bucket starts, unix seconds")
    images_per_minute: list[float]
    succeeded: list[int]
    failed: list[int]
    canceled: list[int]


class QueueSeries(BaseModel):
    """Queue depth from the stored samples; null where no sample was taken."""

    bucket_seconds: int
    t: list[int]
    queued: list[int | None]
    running: list[int | None]
    broker_waiting: list[int | None]


class Percentiles(BaseModel):
    p50: float
    p95: float
    max: float


class StatsView(BaseModel):
    window_seconds: int
    now: datetime
    throughput: ThroughputSeries
    queue: QueueSeries
    images: int
    succeeded: int
    failed: int
    canceled: int
    failures_by_type: dict[str, int]
    duration_seconds: Percentiles | None = Field(description="render time (started to finished) of succeeded jobs")
    wait_seconds: Percentiles | None = Field(description="queue wait (created to started) of jobs that started")
    jobs_by_batch_images: dict[int, int] = Field(default_factory=dict,
                                                 description="succeeded jobs by images per UNet call (batch size)")
    batches: int = Field(0, description="batches formed (distinct batch ids of finished jobs)")


class AdminJobSummary(BaseModel):
    id: uuid.UUID
    owner: str
    model: str
    status: str
    prompt: str
    size: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    progress: float
    attempt: int
    error: ErrorView | None
    thumbnail_url: str | None
    image_count: int


class AdminJobList(BaseModel):
    jobs: list[AdminJobSummary]
    limit: int


class AdminJobDetail(BaseModel):
    owner: str
    cancel_requested: bool
    job: JobView


class CancelResult(BaseModel):
    outcome: Literal["canceled", "requested", "terminal"]
    job: JobView


class RetryResult(BaseModel):
    retry_of: uuid.UUID
    job: JobView
