"""Durable webhook delivery against real processes: Postgres, Redis, the webhook Celery worker, a receiver.

The receiver verifies every request with the `standardwebhooks` library and fails on purpose; the
retry schedule is shortened through the environment so the whole module runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from devtools.embedded import EmbeddedPostgres
from shared.auth import create_api_key
from shared.db.models import ApiKey, Job, JobImage
from shared.jobs import lifecycle
from shared.settings import DEFAULT_RETRY_SCHEDULE, WebhookSettings
from shared.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookGoneEndpoint
from shared.webhooks.outbox import enqueue_job_event, publish_deliveries, redeliver
from shared.webhooks.signing import get_or_create_secret
from tests.conftest import _fresh_database
from tests.farm_harness import ROOT, Proc, start_api, start_webhook_worker, wait_until
from tests.webhook_receiver import Receiver, Reply
from worker.webhook_sender.delivery import HttpResult, dispatch_due, next_delay, parse_retry_after, prune_deliveries

pytestmark = pytest.mark.e2e

PARAMS = {"mode": "txt2img", "prompt": "a lighthouse", "seed": 7, "batch_size": 1, "n_iter": 1,
          "width": 64, "height": 64}


@pytest.fixture(scope="module")
def hooks_env(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[dict[str, str]]:
    """Settings for this process (which enqueues and publishes) and for the webhook worker."""
    from shared.queueing.queues import get_producer
    from shared.settings import get_settings
    from shared.storage.object_store import get_object_store

    env = {
        "DATABASE_URL": _fresh_database(postgres, "webhooks_test"),
        "REDIS_URL": redis_db_url(),
        "STORAGE_URL": str(tmp_path_factory.mktemp("hook-objects")),
        "RENDERFARM_SECRET_KEY": "test-secret",
        "RENDERFARM_PUBLIC_URL": "http://files.test",
        "RENDERFARM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "RENDERFARM_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2",
        "RENDERFARM_WEBHOOK_POLL_SECONDS": "0.2",
        "RENDERFARM_WEBHOOK_REDISPATCH_SECONDS": "2",
        "RENDERFARM_WEBHOOK_TIMEOUT_SECONDS": "5",
    }
    caches = (get_settings, get_producer, get_object_store)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        for cache in caches:
            cache.cache_clear()
        yield env
    for cache in caches:
        cache.cache_clear()


@pytest.fixture(scope="module")
def webhook_worker(hooks_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_webhook_worker(dict(os.environ, **hooks_env, PYTHONUNBUFFERED="1"),
                                tmp_path_factory.mktemp("hook-worker"), name="hooks")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver().running() as r:
        yield r


@pytest.fixture
def session(hooks_env: dict[str, str]) -> Iterator[Session]:
    engine = sa.create_engine(hooks_env["DATABASE_URL"])
    with Session(engine) as s:
        yield s
    engine.dispose()


@pytest.fixture
def api_key(session: Session, receiver: Receiver) -> ApiKey:
    key, _ = create_api_key(session, f"owner-{uuid.uuid4().hex[:8]}")
    receiver.secret = get_or_create_secret(session, key)
    session.commit()
    return key


def new_job(session: Session, key: ApiKey, url: str | None, events: list[str] | None = None) -> Job:
    """A queued job, committed and never published; its webhook is set afterwards, so no `queued` event."""
    job = lifecycle.submit(session, owner=key.owner, api_key_id=key.id, params=PARAMS, model_name="tiny",
                           route="render")
    job.webhook_url, job.webhook_events = url, events
    session.commit()
    return job


def mark_running(session: Session, job: Job) -> None:
    """The row as a claim leaves it, but without the claim's own event: these tests record events by hand."""
    session.execute(update(Job).where(Job.id == job.id)
                    .values(status="running", status_seq=Job.status_seq + 1, lease_owner="w1"))


def finish_job(session: Session, job: Job) -> list[int]:
    """running -> succeeded with one image, and the event recorded by hand in that same transaction."""
    mark_running(session, job)
    session.commit()
    session.execute(update(Job).where(Job.id == job.id).values(status="succeeded", status_seq=Job.status_seq + 1))
    session.add(JobImage(job_id=job.id, index=0, key=f"jobs/{job.id}/0.png", seed=7, width=64, height=64,
                         infotext="a lighthouse"))
    ids = enqueue_job_event(session, job, "succeeded")
    session.commit()
    return ids


def wait_for_status(session: Session, delivery_id: int, *statuses: str, timeout: float = 20) -> WebhookDelivery:
    def done() -> WebhookDelivery | None:
        session.expire_all()
        row = session.get(WebhookDelivery, delivery_id)
        return row if row is not None and row.status in statuses else None

    return wait_until(done, timeout, interval=0.1, message=f"delivery {delivery_id} to become {statuses}")


def attempts_of(session: Session, delivery_id: int) -> list[WebhookAttempt]:
    return list(session.scalars(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.attempt)
    ))


def test_failed_attempts_are_retried_with_the_same_webhook_id(
    session: Session, api_key: ApiKey, receiver: Receiver, webhook_worker: Proc
) -> None:
    receiver.script("/flaky", Reply(500, body=b"boom"), Reply(429, {"Retry-After": "1"}), Reply(200))
    job = new_job(session, api_key, receiver.url("/flaky"))
    [delivery_id] = finish_job(session, job)
    assert enqueue_job_event(session, job, "succeeded") == []  # the same change recorded twice: one event
    session.commit()
    assert publish_deliveries([delivery_id]) == 1

    delivery = wait_for_status(session, delivery_id, DeliveryStatus.DELIVERED)
    requests = receiver.received("/flaky")
    assert len(requests) == 3 and all(r.verified for r in requests), webhook_worker.log()[-3000:]
    assert {r.headers["webhook-id"] for r in requests} == {delivery.webhook_id}
    assert requests[2].at - requests[1].at >= 0.95  # Retry-After: 1 was honoured
    payload = json.loads(requests[2].body)
    assert payload["id"] == str(job.id) and payload["event"] == "succeeded" and payload["status"] == "succeeded"
    assert payload["sequence"] == delivery.sequence and payload["status_seq"] == 3
    assert payload["images"][0]["url"].startswith(f"http://files.test/v1/files/jobs/{job.id}/0.png?")

    attempts = attempts_of(session, delivery_id)
    assert [a.status_code for a in attempts] == [500, 429, 200] and delivery.attempt_count == 3
    assert attempts[0].error == "HTTP 500: boom" and attempts[2].error is None
    assert all(a.duration_ms >= 0 for a in attempts)
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)).all()
    assert len(rows) == 1  # one row per event, whatever the number of attempts


def test_410_stops_every_delivery_to_that_url_until_redelivered(
    session: Session, api_key: ApiKey, receiver: Receiver, webhook_worker: Proc
) -> None:
    receiver.script("/gone", Reply(410))
    first = new_job(session, api_key, receiver.url("/gone"))
    [first_delivery] = finish_job(session, first)
    publish_deliveries([first_delivery])
    stopped = wait_for_status(session, first_delivery, DeliveryStatus.STOPPED)
    assert stopped.attempt_count == 1 and stopped.last_status_code == 410
    assert session.scalar(select(WebhookGoneEndpoint).where(WebhookGoneEndpoint.owner == api_key.owner)) is not None

    second = new_job(session, api_key, receiver.url("/gone"))
    assert finish_job(session, second) == []  # recorded as stopped, nothing to send
    [row] = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == second.id)).all()
    assert row.status == DeliveryStatus.STOPPED and "410" in (row.last_error or "")
    assert len(receiver.received("/gone")) == 1

    # The owner says the endpoint is back: a manual redelivery resumes, with the original webhook-id.
    receiver.script("/gone", Reply(200))
    redelivered = redeliver(session, second)
    session.commit()
    publish_deliveries([redelivered.id])
    wait_for_status(session, row.id, DeliveryStatus.DELIVERED)
    assert receiver.received("/gone")[-1].headers["webhook-id"] == row.webhook_id


def test_redirects_are_not_followed_and_retries_end(
    session: Session, api_key: ApiKey, receiver: Receiver, webhook_worker: Proc
) -> None:
    receiver.script("/moved", Reply(302, {"Location": receiver.url("/target")}))
    job = new_job(session, api_key, receiver.url("/moved"))
    [delivery_id] = finish_job(session, job)
    publish_deliveries([delivery_id])
    failed = wait_for_status(session, delivery_id, DeliveryStatus.FAILED)
    assert failed.attempt_count == 4  # the first attempt and the 3 retries of the test schedule
    assert receiver.received("/target") == []
    assert "redirect" in (failed.last_error or "") and failed.next_attempt_at is None


def test_progress_is_throttled_and_never_retried(
    session: Session, api_key: ApiKey, receiver: Receiver, webhook_worker: Proc
) -> None:
    receiver.script("/progress", Reply(503, {"Retry-After": "1"}))
    job = new_job(session, api_key, receiver.url("/progress"), events=["started", "progress"])
    mark_running(session, job)
    started = enqueue_job_event(session, job, "started")
    first = enqueue_job_event(session, job, "progress")
    assert enqueue_job_event(session, job, "progress") == []  # within 500 ms of the last one
    assert enqueue_job_event(session, job, "succeeded") == []  # not subscribed
    session.commit()
    publish_deliveries(started + first)
    progress = wait_for_status(session, first[0], DeliveryStatus.FAILED)
    assert progress.attempt_count == 1 and progress.next_attempt_at is None
    assert wait_for_status(session, started[0], DeliveryStatus.PENDING).attempt_count >= 1  # state events retry
    assert progress.sequence > session.get(WebhookDelivery, started[0]).sequence


def test_a_lost_message_is_made_good_by_the_poller(
    session: Session, api_key: ApiKey, receiver: Receiver, webhook_worker: Proc
) -> None:
    """Committed but never published (say the process died right after the commit): still delivered."""
    job = new_job(session, api_key, receiver.url("/unpublished"))
    [delivery_id] = finish_job(session, job)  # no publish_deliveries()
    delivered = wait_for_status(session, delivery_id, DeliveryStatus.DELIVERED)
    assert delivered.attempt_count == 1 and len(receiver.received("/unpublished")) == 1


def test_pollers_skip_rows_another_poller_holds(session: Session, api_key: ApiKey, hooks_env: dict[str, str]) -> None:
    job = new_job(session, api_key, "http://127.0.0.1:9/never")
    [delivery_id] = finish_job(session, job)
    future = datetime.now(UTC) + timedelta(hours=1)  # due for this scan, not for the live worker's poller
    session.execute(sa.update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(
        next_attempt_at=future - timedelta(minutes=1), dispatched_at=None))
    session.commit()
    engine = sa.create_engine(hooks_env["DATABASE_URL"])
    with Session(engine) as other:
        assert delivery_id in dispatch_due(session, now=future)  # holds the row lock until commit
        assert delivery_id not in dispatch_due(other, now=future)
        session.commit()
        other.rollback()
    engine.dispose()
    assert delivery_id not in dispatch_due(session, now=future)  # dispatched moments ago
    session.rollback()


@pytest.fixture(scope="module")
def api_url(hooks_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("hook-api")
    proc, base_url = start_api(dict(os.environ, **hooks_env, RENDERFARM_MODELS_DIR=str(logs)), logs)
    yield base_url
    proc.stop()


def test_routes_list_redeliver_and_manage_the_secret(
    session: Session, receiver: Receiver, webhook_worker: Proc, api_url: str
) -> None:
    key, token = create_api_key(session, f"route-owner-{uuid.uuid4().hex[:6]}")
    _, stranger = create_api_key(session, "stranger")
    session.commit()
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        resp = client.get("/v1/webhook-secret")
        assert resp.status_code == 200, f"is api.routes.webhooks.router included in api.main? {resp.text}"
        secret = resp.json()["secret"]
        rotated = client.post("/v1/webhook-secret/rotate").json()["secret"]
        assert secret.startswith("whsec_") and rotated != secret
        assert client.get("/v1/webhook-secret").json()["secret"] == rotated
        receiver.secret = rotated

        job = new_job(session, key, receiver.url("/api"))
        assert client.post(f"/v1/jobs/{job.id}/webhooks").status_code == 409  # not finished: nothing to resend
        [delivery_id] = finish_job(session, job)
        publish_deliveries([delivery_id])
        wait_for_status(session, delivery_id, DeliveryStatus.DELIVERED)

        listing = client.get(f"/v1/jobs/{job.id}/webhooks").json()
        [delivery] = listing["deliveries"]
        assert delivery["event"] == "succeeded" and delivery["status"] == "delivered"
        assert [a["status_code"] for a in delivery["attempts"]] == [200]
        assert httpx.get(f"{api_url}/v1/jobs/{job.id}/webhooks",
                         headers={"Authorization": f"Bearer {stranger}"}).status_code == 404

        resent = client.post(f"/v1/jobs/{job.id}/webhooks")
        assert resent.status_code == 202 and resent.json()["webhook_id"] == delivery["webhook_id"]
        wait_until(lambda: len(receiver.received("/api")) == 2, 10, message="the redelivery")
        assert client.post(f"/v1/jobs/{job.id}/webhooks", json={"delivery_id": 10**9}).status_code == 404
    requests = receiver.received("/api")
    assert all(r.verified for r in requests) and {r.headers["webhook-id"] for r in requests} == {
        delivery["webhook_id"]}


def test_finished_deliveries_are_pruned_after_their_keeping_time(session: Session, api_key: ApiKey) -> None:
    job = new_job(session, api_key, "http://127.0.0.1:9/pruned", events=["progress", "succeeded"])
    mark_running(session, job)
    [progress] = enqueue_job_event(session, job, "progress")
    [final] = finish_job(session, job)
    long_ago = datetime.now(UTC) - timedelta(days=2)
    session.execute(sa.update(WebhookDelivery).where(WebhookDelivery.id.in_([progress, final])).values(
        status=DeliveryStatus.FAILED, finished_at=long_ago, next_attempt_at=None))
    session.commit()
    prune_deliveries(session)
    session.commit()
    assert session.get(WebhookDelivery, progress) is None  # progress history: one day
    assert session.get(WebhookDelivery, final) is not None  # state events: 30 days by default


def test_retry_schedule_jitter_and_retry_after() -> None:
    cfg = WebhookSettings(retry_schedule=(10, 100), jitter=0.2, max_retry_after_seconds=60)
    failure = HttpResult(500, "HTTP 500", None, 5)
    assert 8 <= next_delay(failure, 0, cfg) <= 12 and 80 <= next_delay(failure, 1, cfg) <= 120
    assert next_delay(failure, 2, cfg) is None  # the schedule is spent
    assert next_delay(HttpResult(429, "HTTP 429", 30, 5), 0, cfg) == 30
    assert next_delay(HttpResult(503, "HTTP 503", 3600, 5), 0, cfg) == 60  # capped
    assert 8 <= next_delay(HttpResult(500, "HTTP 500", 30, 5), 0, cfg) <= 12  # only 429/503 carry Retry-After
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120") == 120 and parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 01 Jan 2025 00:01:00 GMT", now=now) == 60
    assert 2.5 < sum(DEFAULT_RETRY_SCHEDULE) / 86400 < 3.5  # the default reaches about three days


def test_no_webhook_no_delivery(session: Session, api_key: ApiKey) -> None:
    job = new_job(session, api_key, None)
    assert finish_job(session, job) == []
    with pytest.raises(ValueError, match="unknown webhook event"):
        enqueue_job_event(session, job, "exploded")


def test_webhook_worker_imports_no_torch() -> None:
    code = "import sys, worker.webhook_sender.app; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('torch', 'diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


