"""Tables of the webhook outbox: one row per event to deliver, one row per HTTP attempt.

A delivery row is written in the same transaction as the job state change it reports, so an
event exists exactly when the change commits (docs/architecture.md, rule 1); the sender only ever reads rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db.models import Base


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its next attempt (or being attempted)
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"  # retries exhausted, or a progress event's only attempt failed
    STOPPED = "stopped"  # the endpoint answered 410 Gone: nothing more is sent to that URL


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # The Standard Webhooks `webhook-id`: the same on every attempt so receivers can deduplicate.
    webhook_id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), nullable=True)
    event: Mapped[str] = mapped_column(String(20))
    # Rises with every event of a job, so receivers can drop out-of-order deliveries.
    sequence: Mapped[int] = mapped_column(BigInteger)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    # Position in the retry schedule; a manual redelivery starts it again.
    retry_step: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # An attempt in flight holds the row until locked_until; lock_token names that attempt.
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lock_token: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    # When a broker message was last sent for it; the poller re-sends one that got lost.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    attempts: Mapped[list[WebhookAttempt]] = relationship(
        back_populates="delivery", order_by="WebhookAttempt.attempt", lazy="selectin", cascade="all, delete-orphan"
    )

    __table_args__ = (
        UniqueConstraint("job_id", "sequence", name="uq_webhook_deliveries_job_sequence"),
        # The poller's scan: only pending rows, oldest due first.
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        # The progress throttle and the per-URL stop look rows up by job/event and owner/url.
        Index("ix_webhook_deliveries_job_event", "job_id", "event", "created_at"),
        Index("ix_webhook_deliveries_owner_url_pending", "owner", "url", postgresql_where=text("status = 'pending'")),
    )


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    delivery: Mapped[WebhookDelivery] = relationship(back_populates="attempts")


class WebhookGoneEndpoint(Base):
    """A URL that answered 410 Gone for an owner: their deliveries to it stop until they redeliver by hand."""

    __tablename__ = "webhook_gone_endpoints"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    url_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the URL: Text keys index badly
    url: Mapped[str] = mapped_column(Text)
    delivery_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="SET NULL"), nullable=True
    )
    gone_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
