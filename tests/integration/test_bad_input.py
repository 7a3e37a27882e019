"""Bad input gets a 422 naming the field, and leaves nothing behind: no row, no queue message."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.farm_harness import Farm

VALID = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}

BAD_CASES = [
    ({"width": 4096}, "width", "at most"),
    ({"width": 1024, "height": 2048}, "width", "exceeds the limit"),
    ({"width": 32}, "width", "greater than or equal"),
    ({"steps": 0}, "steps", "greater than or equal"),
    ({"steps": 151}, "steps", "between 1 and 150"),
    ({"batch_size": 0}, "batch_size", "greater than or equal"),
    ({"batch_size": 9}, "batch_size", "between 1 and 8"),
    ({"n_iter": 17}, "n_iter", "between 1 and 16"),
    ({"batch_size": 8, "n_iter": 5}, "n_iter", "images per job"),
    ({"model": "no-such-model"}, "model", "available models: demo-tiny"),
    ({"model": "../Stable-diffusion/demo-tiny"}, "model", "not a name inside"),
    ({"model": "/etc/passwd"}, "model", "not a name inside"),
    ({"sampler_name": "Euler z"}, "sampler_name", "DPM++ 2M"),
    ({"scheduler": "Sideways"}, "scheduler", "Karras"),
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler", "supports the schedule types"),
    ({"steps": "many"}, "steps", "integer"),
    ({"width": 64.5}, "width", "integer"),
    ({"seed": "abc"}, "seed", "integer"),
    ({"seed": -2}, "seed", "greater than or equal"),
    ({"seed": 2**32}, "seed", "less than or equal"),
    ({"prompt": 5}, "prompt", "string"),
    ({"cfg_scale": 99}, "cfg_scale", "less than or equal"),
    ({"sampler": "Euler"}, "sampler", "Extra inputs are not permitted"),
    ({"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_url", "127.0.0.1"),
    ({"webhook_url": "http://10.0.0.1/hook"}, "webhook_url", "10.0.0.1"),
    ({"webhook_url": "http://169.254.169.254/latest/meta-data"}, "webhook_url", "169.254.169.254"),
    ({"webhook_url": "http://[::1]/hook"}, "webhook_url", "::1"),
    ({"webhook_url": "http://localhost/hook"}, "webhook_url", "localhost"),
    ({"webhook_url": "ftp://example.com/hook"}, "webhook_url", "http"),
    ({"webhook_events": ["finished"]}, "webhook_events", "succeeded"),
    ({"batch_invariant": "sometimes"}, "batch_invariant", "boolean"),
    ({"batch_invariant": [True]}, "batch_invariant", "boolean"),
    ({"override_settings": {"renderfarm_batch_invariant": "sometimes"}}, "renderfarm_batch_invariant", "boolean"),
    # NUL cannot be stored in a job row: refused wherever it is, naming the field (issue 18, first part)
    ({"prompt": "a\u0000b"}, "prompt", "NUL"),
    ({"negative_prompt": "x\u0000"}, "negative_prompt", "NUL"),
    ({"infotext": "a cat\u0000\nSteps: 4"}, "infotext", "NUL"),
    ({"styles": ["ok", "b\u0000d"]}, "styles", "NUL"),
    ({"loras": [{"name": "a\u0000", "weight": 1}]}, "loras", "NUL"),
]


def _counts(farm: Farm) -> tuple[int, int]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    queued = redis.Redis.from_url(farm.env["REDIS_URL"]).llen("render")
    return rows, queued


@pytest.fixture
def client(api_only: Farm) -> Iterator[httpx.Client]:
    with api_only.client() as c:
        yield c


@pytest.mark.parametrize(("change", "field", "message"), BAD_CASES, ids=[c[1] + "-" + str(i) for i, c in
                                                                          enumerate(BAD_CASES)])
def test_bad_input_is_422_and_leaves_nothing(api_only: Farm, client: httpx.Client, change: dict, field: str,
                                             message: str) -> None:
    before = _counts(api_only)
    resp = client.post("/v1/jobs", json={**VALID, **change})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert any(d["loc"][-1] == field for d in detail), detail
    assert any(message in d["msg"] for d in detail), detail
    assert _counts(api_only) == before


def test_malformed_json_is_422(api_only: Farm, client: httpx.Client) -> None:
    before = _counts(api_only)
    resp = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422
    assert _counts(api_only) == before


def test_unauthenticated_submit_leaves_nothing(api_only: Farm) -> None:
    before = _counts(api_only)
    assert api_only.anonymous().post("/v1/jobs", json=VALID).status_code == 401
    assert _counts(api_only) == before


def test_valid_job_creates_exactly_one_row_and_one_message(api_only: Farm, client: httpx.Client) -> None:
    """The counterpart of the cases above: proves the counters do see a real submission."""
    rows, queued = _counts(api_only)
    resp = client.post("/v1/jobs", json=VALID)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued"
    assert _counts(api_only) == (rows + 1, queued + 1)


def test_batch_invariant_is_stored_and_keeps_the_job_out_of_batches(api_only: Farm, client: httpx.Client) -> None:
    """The job field and the WebUI API's override key both make the job batch-invariant (no batch key)."""
    ids = []
    for body in ({**VALID, "batch_invariant": True},
                 {**VALID, "override_settings": {"renderfarm_batch_invariant": True}}, VALID):
        resp = client.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
        assert resp.json()["batch_id"] is None and resp.json()["batch_images"] is None
    engine = sa.create_engine(api_only.env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id::text, batch_key, params->>'batch_invariant' FROM jobs "
                                    "WHERE id::text = ANY(:ids)"), {"ids": ids}).all()
    engine.dispose()
    found = {row[0]: (row[1], row[2]) for row in rows}
    assert found[ids[0]] == (None, "true") and found[ids[1]] == (None, "true")
    assert found[ids[2]][1] == "false" and found[ids[2]][0] is not None and len(found[ids[2]][0]) == 32


@pytest.mark.parametrize("raw", [
    '{"prompt": "x", "cfg_scale": NaN}', '{"prompt": "x", "cfg_scale": Infinity}',
    '{"prompt": "x", "hr_scale": -Infinity}', '{"prompt": "\\ud800 lone surrogate"}',
])
def test_unrepresentable_input_is_a_422_too(api_only: Farm, client: httpx.Client, raw: str) -> None:
    """Inputs the default validation handler could not echo back (it answered 500) get their 422."""
    before = _counts(api_only)
    resp = client.post("/v1/jobs", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"][-1] in ("cfg_scale", "hr_scale", "prompt")
    assert _counts(api_only) == before


def test_the_webui_api_refuses_nul_and_nan_with_a_422(api_only: Farm, client: httpx.Client) -> None:
    before = _counts(api_only)
    for raw in ('{"prompt": "a\\u0000b", "width": 64, "height": 64}', '{"prompt": "x", "cfg_scale": NaN}'):
        resp = client.post("/sdapi/v1/txt2img", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert resp.status_code == 422, resp.text
    assert _counts(api_only) == before


def test_an_offset_past_the_databases_integers_is_a_422(client: httpx.Client) -> None:
    resp = client.get("/v1/jobs", params={"offset": 2**63})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "offset"]
    assert client.get("/v1/jobs", params={"offset": 2**63 - 1}).json()["jobs"] == []
