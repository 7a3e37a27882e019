"""Webhook deliveries of a job (listing, redelivery) and the caller's signing secret."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, status

from api.deps import CurrentKey, SessionDep, StoreDep
from api.responses import CONFLICT, NOT_FOUND
from api.webhook_views import (
    DeliveryListView,
    DeliveryView,
    RedeliverRequest,
    WebhookSecretView,
    delivery_view,
)
from shared.jobs import repository
from shared.webhooks import outbox
from shared.webhooks.signing import get_or_create_secret, rotate_secret

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.get("/jobs/{job_id}/webhooks", response_model=DeliveryListView, responses=NOT_FOUND)
def list_job_webhooks(job_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> DeliveryListView:
    job = repository.get_job(session, job_id, owner=key.owner)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    deliveries = outbox.list_deliveries(session, job.id)
    return DeliveryListView(job_id=str(job.id), deliveries=[delivery_view(d) for d in deliveries])


@router.post("/jobs/{job_id}/webhooks", status_code=status.HTTP_202_ACCEPTED, response_model=DeliveryView,
             responses={**NOT_FOUND, **CONFLICT})
def redeliver_job_webhook(
    job_id: uuid.UUID, key: CurrentKey, session: SessionDep, store: StoreDep, body: RedeliverRequest | None = None
) -> DeliveryView:
    """Send an event again with its original webhook-id: the latest terminal one, or `delivery_id`."""
    job = repository.get_job(session, job_id, owner=key.owner)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    try:
        delivery = outbox.redeliver(session, job, body.delivery_id if body else None, store=store)
    except outbox.NothingToRedeliver as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except LookupError as exc:
        session.rollback()
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    session.commit()
    outbox.publish_deliveries([delivery.id])  # after the commit; the poller covers a lost message
    return delivery_view(delivery)


@router.get("/webhook-secret", response_model=WebhookSecretView)
def get_webhook_secret(key: CurrentKey, session: SessionDep) -> WebhookSecretView:
    """The secret that signs webhooks of jobs submitted with this API key (created on first request)."""
    secret = get_or_create_secret(session, key)
    session.commit()
    return WebhookSecretView(secret=secret, api_key_prefix=key.key_prefix)


@router.post("/webhook-secret/rotate", response_model=WebhookSecretView)
def rotate_webhook_secret(key: CurrentKey, session: SessionDep) -> WebhookSecretView:
    """A new secret for this API key; every attempt from now on, retries included, is signed with it."""
    secret = rotate_secret(session, key)
    session.commit()
    return WebhookSecretView(secret=secret, api_key_prefix=key.key_prefix)
