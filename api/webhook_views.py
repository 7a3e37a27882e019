"""JSON shapes of the webhook routes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from shared.webhooks.models import WebhookDelivery


class AttemptView(BaseModel):
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None


class DeliveryView(BaseModel):
    id: int
    webhook_id: str = Field(description="the `webhook-id` header: the same on every attempt of this event")
    event: str
    sequence: int
    url: str
    status: str = Field(description="pending, delivered, failed (gave up) or stopped (the URL answered 410)")
    attempt_count: int
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    attempts: list[AttemptView]


class DeliveryListView(BaseModel):
    job_id: str
    deliveries: list[DeliveryView]


class RedeliverRequest(BaseModel):
    delivery_id: int | None = Field(None, description="the delivery to send again; default: the latest terminal event")


class WebhookSecretView(BaseModel):
    secret: str = Field(description="verify deliveries with any Standard Webhooks library: Webhook(secret).verify(...)")
    api_key_prefix: str


def delivery_view(delivery: WebhookDelivery) -> DeliveryView:
    return DeliveryView(
        id=delivery.id,
        webhook_id=delivery.webhook_id,
        event=delivery.event,
        sequence=delivery.sequence,
        url=delivery.url,
        status=delivery.status,
        attempt_count=delivery.attempt_count,
        next_attempt_at=delivery.next_attempt_at,
        created_at=delivery.created_at,
        finished_at=delivery.finished_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        attempts=[AttemptView.model_validate(a, from_attributes=True) for a in delivery.attempts],
    )
