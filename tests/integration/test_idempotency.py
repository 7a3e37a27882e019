"""Idempotency-Key on POST /v1/jobs: same key + body → same job; other body → 422; in flight → 409."""

from __future__ import annotations

import uuid

import redis
import sqlalchemy as sa

from tests.conftest import make_key
from tests.farm_harness import Farm

BODY = {"prompt": "once only", "width": 64, "height": 64, "steps": 2, "seed": 11}


def _rows(farm: Farm, sql: str, **params: object) -> int:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        value = conn.execute(sa.text(sql), params).scalar_one()
    engine.dispose()
    return value


def test_same_key_same_body_is_the_same_job(api_only: Farm) -> None:
    idem = f"k-{uuid.uuid4()}"
    body = {**BODY, "prompt": idem}
    queue = redis.Redis.from_url(api_only.env["REDIS_URL"])
    before = queue.llen("render")
    with api_only.client() as c:
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": idem})
        second = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": idem})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert _rows(api_only, "SELECT count(*) FROM jobs WHERE params->>'prompt' = :p", p=idem) == 1
    assert queue.llen("render") == before + 1


def test_same_key_different_body_is_422(api_only: Farm) -> None:
    idem = f"k-{uuid.uuid4()}"
    with api_only.client() as c:
        assert c.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": idem}).status_code == 202
        resp = c.post("/v1/jobs", json={**BODY, "seed": 12}, headers={"Idempotency-Key": idem})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_keys_are_scoped_per_api_key(api_only: Farm) -> None:
    idem = f"k-{uuid.uuid4()}"
    other = make_key(api_only.env["DATABASE_URL"], "someone")
    with api_only.client() as c:
        mine = c.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": idem}).json()["id"]
    with api_only.client(other) as c:
        theirs = c.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": idem}).json()["id"]
    assert mine != theirs


def test_request_in_flight_is_409(api_only: Farm) -> None:
    idem = f"k-{uuid.uuid4()}"
    engine = sa.create_engine(api_only.env["DATABASE_URL"])
    with engine.begin() as conn:
        key_id = conn.execute(sa.text("SELECT id FROM api_keys WHERE owner='admin' LIMIT 1")).scalar_one()
        from api.submission.idempotency import fingerprint
        from shared.jobs.schemas import Txt2ImgRequest

        conn.execute(
            sa.text("INSERT INTO idempotency_keys (api_key_id, key, fingerprint) VALUES (:a, :k, :f)"),
            {"a": key_id, "k": idem, "f": fingerprint(Txt2ImgRequest(**BODY).model_dump(mode="json"))},
        )
    engine.dispose()
    with api_only.client() as c:
        resp = c.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": idem})
    assert resp.status_code == 409, resp.text


def test_bad_input_does_not_consume_the_key(api_only: Farm) -> None:
    idem = f"k-{uuid.uuid4()}"
    with api_only.client() as c:
        assert c.post("/v1/jobs", json={**BODY, "width": 4096}, headers={"Idempotency-Key": idem}).status_code == 422
        assert c.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": idem}).status_code == 202
