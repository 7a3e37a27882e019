"""Limits on job creation (api/limits.py) through the API in this process, with real PostgreSQL and Redis: the
rate limit (429, Retry-After, RateLimit fields; refill; state in Redis that a fresh app sees), the cap on queued
jobs, GPU-seconds/images quotas used up by a job finished through the lifecycle and reset at the period's end, and
the WebUI API's creation routes getting the same 429.

The test farm's default rate limit is generous (tests/conftest.py, `farm_env`); each test sets a tight policy for
an owner of its own through the admin API."""

from __future__ import annotations

import base64
import io
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.jobs import lifecycle, repository
from shared.owners.periods import next_day_start
from shared.owners.policy import POLICY_CACHE
from shared.owners.ratelimit import KEY_PREFIX
from tests.conftest import make_key, reset_process_caches
from tests.farm_harness import Farm

BODY = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def _owner(farm: Farm, policy: dict[str, Any]) -> tuple[str, str]:
    """A new owner with one key and the given policy (set by an admin)."""
    owner = f"limits-{uuid.uuid4().hex[:8]}"
    with farm.client(farm.admin_key) as admin:
        answer = admin.put(f"/v1/admin/owners/{owner}", json=policy)
    assert answer.status_code == 200, answer.text
    return owner, make_key(farm.env["DATABASE_URL"], owner)


def _post(client: httpx.Client, **change: Any) -> httpx.Response:
    return client.post("/v1/jobs", json={**BODY, **change})


def test_a_burst_gets_429_with_retry_after_and_ratelimit_fields(api_only: Farm) -> None:
    _, key = _owner(api_only, {"rate_burst": 3, "rate_per_second": 0.5})
    with api_only.client(key) as c:
        answers = [_post(c, seed=i) for i in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    # Successes carry the fields too: r counts down, t is the time until the bucket is full again.
    assert answers[0].headers["RateLimit-Policy"] == '"burst";q=3;w=6'
    assert answers[0].headers["RateLimit"] == '"burst";r=2;t=2'
    assert answers[2].headers["RateLimit"].startswith('"burst";r=0;t=')
    refused = answers[3]
    assert refused.headers["Retry-After"] == "2"  # one token at 0.5 a second
    assert refused.headers["RateLimit-Policy"] == '"burst";q=3;w=6'
    assert refused.headers["RateLimit"].startswith('"burst";r=0;t=')
    body = refused.json()
    assert body["limit"] == "rate" and body["retry_after"] == 2
    assert "3 at once and 0.5 a second" in body["detail"]


def test_the_bucket_refills(api_only: Farm) -> None:
    _, key = _owner(api_only, {"rate_burst": 1, "rate_per_second": 20})
    with api_only.client(key) as c:
        assert _post(c).status_code == 202
        refused = _post(c)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        time.sleep(0.15)  # 20 a second: one token back after 0.05 s
        assert _post(c).status_code == 202


def test_the_bucket_lives_in_redis_and_a_fresh_app_sees_it(api_only: Farm) -> None:
    owner, key = _owner(api_only, {"rate_burst": 2, "rate_per_second": 0.01})
    with api_only.client(key) as c:
        assert [_post(c, seed=i).status_code for i in range(2)] == [202, 202]
    stored = redis.Redis.from_url(api_only.env["REDIS_URL"])
    assert float(stored.hget(KEY_PREFIX + owner, "tokens") or -1) < 1
    assert 0 < stored.pttl(KEY_PREFIX + owner) <= (2 / 0.01) * 1000 + 1000  # gone once it would be full again

    # A restart: this process forgets every cache (settings, policies, Redis clients) and builds a new app.
    reset_process_caches()
    POLICY_CACHE.clear()
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(), base_url=api_only.base_url, headers={"Authorization": f"Bearer {key}"}) as fresh:
        refused = _post(fresh)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 90


def test_the_queued_cap_names_the_cap(api_only: Farm) -> None:
    _, key = _owner(api_only, {"max_queued": 2})
    with api_only.client(key) as c:
        first = _post(c, seed=1)
        assert _post(c, seed=2).status_code == 202
        refused = _post(c, seed=3)
        assert refused.status_code == 429
        assert refused.json()["detail"].startswith("2 jobs queued; the cap is 2")
        assert (refused.json()["queued"], refused.json()["cap"]) == (2, 2)
        assert "Retry-After" in refused.headers
        assert c.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200
        assert _post(c, seed=4).status_code == 202


def _finish_as_a_worker(farm: Farm, job_id: str, render_seconds: float) -> None:
    """Claim and succeed the job through the lifecycle, as worker/runner.py does."""
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with Session(engine) as session:
        job = lifecycle.claim(session, uuid.UUID(job_id), "limits-worker", 60)
        assert job is not None
        image = repository.ImageRecord(index=0, key=f"jobs/{job_id}/0.png", seed=1, width=64, height=64, infotext="x")
        assert lifecycle.succeed(session, job.id, "limits-worker", [image], render_seconds=render_seconds)
        session.commit()
    engine.dispose()


def test_an_images_quota_used_up_answers_429_until_the_next_utc_day(api_only: Farm) -> None:
    owner, key = _owner(api_only, {"images_per_day": 1, "gpu_seconds_per_month": 1000})
    with api_only.client(key) as c:
        job = _post(c).json()
        assert _post(c, seed=2).status_code == 202  # running and queued jobs are not counted
        _finish_as_a_worker(api_only, job["id"], render_seconds=2.5)
        refused = _post(c, seed=3)
        usage = c.get("/v1/usage").json()
    assert refused.status_code == 429
    body = refused.json()
    now = utcnow()
    reset = next_day_start(now)
    assert body["limit"] == "images_per_day" and body["resets_at"] == reset.isoformat().replace("+00:00", "Z")
    assert abs(int(refused.headers["Retry-After"]) - (reset - now).total_seconds()) < 5
    assert "images quota per day used up: 1 of 1" in body["detail"]
    assert usage["today"]["images"] == 1 and usage["today"]["images_left"] == 0
    assert usage["today"]["gpu_seconds"] == 2.5 and usage["month"]["gpu_seconds_left"] == 997.5
    assert usage["today"]["resets_at"].startswith(reset.date().isoformat())

    # The next UTC day the quota is back: the same check with the clock moved past the reset.
    from api.limits import LimitExceeded, check_job_creation
    from shared.settings import get_settings

    with pytest.raises(LimitExceeded):
        check_job_creation(owner, get_settings(), now=now)
    check_job_creation(owner, get_settings(), now=reset + timedelta(seconds=1))


def test_a_gpu_seconds_quota_counts_measured_render_time(api_only: Farm) -> None:
    _, key = _owner(api_only, {"gpu_seconds_per_day": 3})
    with api_only.client(key) as c:
        first = _post(c).json()
        _finish_as_a_worker(api_only, first["id"], render_seconds=2.0)
        second = _post(c, seed=2)
        assert second.status_code == 202  # 2 of 3 s used
        _finish_as_a_worker(api_only, second.json()["id"], render_seconds=1.5)
        refused = _post(c, seed=3)
    assert refused.status_code == 429 and refused.json()["limit"] == "gpu_seconds_per_day"
    assert "GPU-seconds quota per day used up: 3.5 of 3" in refused.json()["detail"]


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("path", "body"), [
    ("/sdapi/v1/txt2img", {"prompt": "p", "width": 64, "height": 64, "steps": 2}),
    ("/sdapi/v1/img2img", {"prompt": "p", "width": 64, "height": 64, "steps": 2, "init_images": ["PNG"]}),
    ("/sdapi/v1/extra-single-image", {"image": "PNG", "upscaling_resize": 2}),
    ("/sdapi/v1/extra-batch-images", {"imageList": [{"data": "PNG", "name": "a.png"}], "upscaling_resize": 2}),
])
def test_the_webui_api_gets_the_same_429(api_only: Farm, path: str, body: dict[str, Any]) -> None:
    _, key = _owner(api_only, {"rate_burst": 1, "rate_per_second": 0.01})
    body = {k: ([_png()] if v == ["PNG"] else _png() if v == "PNG" else
                [dict(item, data=_png()) for item in v] if k == "imageList" else v) for k, v in body.items()}
    with api_only.client(key) as c:
        assert _post(c).status_code == 202  # the owner's one token, taken through /v1/jobs
        basic = base64.b64encode(f"webui:{key}".encode()).decode()
        refused = c.post(path, json=body, headers={"Authorization": f"Basic {basic}"})
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 90
    assert refused.headers["RateLimit-Policy"] == '"burst";q=1;w=100'


def test_without_redis_the_rate_limit_lets_requests_through_and_the_cap_still_counts(
        api_only: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    from api import limits

    class Down:
        def take(self, *args: object, **kwargs: object) -> None:
            raise redis.ConnectionError("Connection refused")

    async def down_on_loop(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("Connection refused")

    _, key = _owner(api_only, {"rate_burst": 1, "rate_per_second": 0.01, "max_queued": 2})
    monkeypatch.setattr(limits, "_buckets", lambda: Down())
    monkeypatch.setattr(limits, "take_on_loop", down_on_loop)  # the limits on the event loop (the policy cached)
    with api_only.client(key) as c:
        answers = [_post(c, seed=i) for i in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]  # past the burst of 1; the queued cap holds
    assert "RateLimit" not in answers[0].headers
    assert answers[2].json()["limit"] == "max_queued"
