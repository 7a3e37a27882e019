"""SQLAlchemy models: Postgres is the source of truth for every job.

A job exists when its row commits; broker messages only carry its id.
`status_seq` rises with every state change so readers can order events.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # May add, rename and delete files of the shared model store (admins always may).
    can_manage_models: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Standard Webhooks signing secret ("whsec_..."), retrievable and rotatable by the key's owner.
    webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    mode: Mapped[str] = mapped_column(String(20), default="txt2img")
    status: Mapped[str] = mapped_column(String(20), default="queued")
    status_seq: Mapped[int] = mapped_column(BigInteger, default=1)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    model_name: Mapped[str] = mapped_column(String(500))
    model_hash: Mapped[str | None] = mapped_column(String(16), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    progress: Mapped[float] = mapped_column(default=0.0)
    error_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The queue the latest message went to: "render", or a model's queue (shared/queueing/routing.py).
    route: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Set when a cancel is asked for a running job; its worker stops at the next denoising step.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Webhook target and the events it wants (subset of queued/started/progress/succeeded/failed/canceled).
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONB, nullable=True)
    # Micro-batching: the render contract's batch key digest (None: never batched), the batch the job was
    # claimed in (shared by the jobs that rode together), the images per UNet call that rendered it, and
    # its share of the batch's render time.
    batch_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    batch_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    render_seconds: Mapped[float | None] = mapped_column(nullable=True)
    # Fair share (issue 17): orders the owner's own queued jobs (higher first; the range an owner may use is its
    # policy's), and `front_at`, set by an admin, puts a job ahead of every fair-share choice.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    front_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What a running job is doing before it renders: "downloading" while its worker pulls model files from the
    # model store (issue 19); None otherwise. Not a state: the status stays `running`.
    phase: Mapped[str | None] = mapped_column(String(20), nullable=True)
    # A training job's own state (issue 15; None for renders), written only by `lifecycle.report_training`:
    # {"step", "steps", "loss", "learn_rate", "eta_seconds", "losses": [...], "checkpoint": {"step", "key"},
    #  "previews": [{"step", "key", "prompt"}], "result": {"file", "sha256", ...}}.
    training: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)

    images: Mapped[list[JobImage]] = relationship(
        back_populates="job", order_by="JobImage.index", lazy="selectin"
    )

    # INSERT ... RETURNING fetches server defaults (created_at), so a new job needs no refresh.
    __mapper_args__ = {"eager_defaults": True}

    __table_args__ = (
        Index("ix_jobs_owner_created", "owner", text("created_at DESC"), "id"),  # an owner's list, in its order
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_queued_batch_key", "batch_key", "created_at", postgresql_where=text("status = 'queued'")),
    )


class JobImage(Base):
    __tablename__ = "job_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(500))
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    infotext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    job: Mapped[Job] = relationship(back_populates="images")

    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_job_images_job_index"),)


# --- Admin dashboard (issue 6): farm-wide switches, queue samples, and indexes its queries need ---


class FarmState(Base):
    """The single row (id=1) of farm-wide switches; Postgres holds them so every API replica and worker agrees."""

    __tablename__ = "farm_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    paused_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (CheckConstraint("id = 1", name="ck_farm_state_single_row"),)


class QueueSample(Base):
    """Queue depth at one moment; `sampled_at` is rounded to the sampling period so replicas write one row each."""

    __tablename__ = "queue_samples"

    sampled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    queued: Mapped[int] = mapped_column(Integer)
    running: Mapped[int] = mapped_column(Integer)
    broker_waiting: Mapped[int | None] = mapped_column(Integer, nullable=True)
    workers_alive: Mapped[int | None] = mapped_column(Integer, nullable=True)


class MetricCounter(Base):
    """A Prometheus counter (or histogram part) summed from finished jobs, so /metrics never scans all jobs."""

    __tablename__ = "metric_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(500), primary_key=True, server_default="")
    key: Mapped[str] = mapped_column(String(64), primary_key=True, server_default="")  # status, error type or le
    value: Mapped[float] = mapped_column(server_default="0")


class MetricsCountedJob(Base):
    """Jobs already added to metric_counters, kept for a few minutes so a late commit is counted exactly once."""

    __tablename__ = "metrics_counted_jobs"

    job_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


# The dashboard lists recent jobs, counts finished jobs and images per minute: each needs its own index.
Index("ix_jobs_created_at", Job.created_at)
Index("ix_jobs_finished_at", Job.finished_at)
Index("ix_job_images_created_at", JobImage.created_at)


class IdempotencyKey(Base):
    """An `Idempotency-Key` seen on POST /v1/jobs, scoped per API key; job_id is NULL while the first is in flight."""

    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)


class OwnerPolicy(Base):
    """What an admin set for one owner (the `owner` of its API keys): its fair-share weight and limits. A missing
    row, or a NULL column, means the default from settings (shared/settings.py, `FairShareSettings`)."""

    __tablename__ = "owner_policies"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Share of the fleet relative to other owners with queued work (2.0 gets twice a 1.0's GPU time).
    weight: Mapped[float | None] = mapped_column(nullable=True)
    # Jobs of this owner running at once across the fleet (0: no cap).
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Highest `priority` this owner's jobs may ask for (lower values are always allowed, down to the minimum).
    max_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Jobs this owner may have queued at once (0: no cap).
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Job creation rate limit (token bucket): burst size and sustained rate per second.
    rate_burst: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rate_per_second: Mapped[float | None] = mapped_column(nullable=True)
    # Quotas per UTC day and month (0: none), in measured render seconds and in images.
    gpu_seconds_per_day: Mapped[float | None] = mapped_column(nullable=True)
    gpu_seconds_per_month: Mapped[float | None] = mapped_column(nullable=True)
    images_per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
    images_per_month: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())


# Fair share reads the queued jobs a worker may take per owner, and the owners' recent render time.
Index("ix_jobs_queued_owner", Job.owner, Job.priority.desc(), Job.created_at,
      postgresql_where=text("status = 'queued'"))
Index("ix_jobs_running_owner", Job.owner, postgresql_where=text("status = 'running'"))


class OwnerUsage(Base):
    """What one owner's finished jobs used on one UTC day: measured render seconds and images (issue 17). Kept
    as each job succeeds (`shared.owners.usage.record_usage`), so a quota check reads at most a month of rows."""

    __tablename__ = "owner_usage"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))
    images: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    jobs: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class ModelFile(Base):
    """One file of the shared model store (issue 19): a checkpoint, LoRA, VAE or embedding, content-addressed by
    SHA-256 in the object store (`shared.models.store_registry.object_key`). `name` is its path inside its kind's
    WebUI folder (`Lora/<name>`), with extension. `stored` is false for a file registered from a models folder and
    not uploaded: listed, but only workers that have it can render it."""

    __tablename__ = "model_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    short_hash: Mapped[str] = mapped_column(String(10))  # the WebUI's "Model hash" / "VAE hash"
    lora_hash: Mapped[str | None] = mapped_column(String(12), nullable=True)  # "Lora hashes" (LoRAs only)
    legacy_hash: Mapped[str | None] = mapped_column(String(8), nullable=True)  # the pre-2023 model hash
    architecture: Mapped[str | None] = mapped_column(String(20), nullable=True)
    file_metadata: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default=text("'{}'::jsonb"))
    # what the farm found in the file beyond its hashes (a ControlNet's "layout": "ldm" or "diffusers")
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default=text("'{}'::jsonb"))
    stored: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    source: Mapped[str] = mapped_column(String(20))  # "upload", "url" or "folder"
    added_by: Mapped[str] = mapped_column(String(200))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (UniqueConstraint("kind", "name", name="uq_model_files_kind_name"),
                      Index("ix_model_files_sha256", "sha256"))


class ModelUpload(Base):
    """A resumable upload of a model file in progress (``/v1/models/uploads``): its chunks are objects in the
    store (``model-uploads/<id>/<part>``), listed in ``parts`` as [offset, length, key] in order."""

    __tablename__ = "model_uploads"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    received: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    parts: Mapped[list[Any]] = mapped_column(JSONB, default=list, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Dataset(Base):
    """A training dataset (``POST /v1/datasets``): its images, re-encoded as PNG in the object store
    (``datasets/<id>/<n>.png``), listed in ``items`` in order with their captions:
    ``[{"file", "key", "width", "height", "caption"}]``."""

    __tablename__ = "datasets"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    image_count: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    items: Mapped[list[Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("ix_datasets_owner_created", "owner", "created_at"),)
