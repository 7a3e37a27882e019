"""End to end over HTTP: submit jobs, poll them to `succeeded`, download every image."""

from __future__ import annotations

import io
import uuid

import httpx
import pytest
from PIL import Image

from shared.webui.infotext import parse_infotext
from tests.conftest import make_key
from tests.farm_harness import Farm

pytestmark = pytest.mark.e2e

TINY = {"width": 64, "height": 64, "steps": 3}


def fetch_png(url: str) -> Image.Image:
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200, resp.text
    image = Image.open(io.BytesIO(resp.content))
    image.load()
    return image


def test_job_renders_and_images_carry_infotext(farm: Farm) -> None:
    body = {"prompt": "a red (lighthouse:1.2), at dusk", "negative_prompt": "blurry", "seed": 1234,
            "sampler_name": "Euler a", "cfg_scale": 6.5, "batch_size": 2, "n_iter": 2, **TINY}
    created = farm.submit(body)
    assert created["status"] in ("queued", "running", "succeeded")
    assert created["links"]["self"] == f"/v1/jobs/{created['id']}"

    job = farm.wait_for(created["id"])
    assert job["status"] == "succeeded", job
    assert job["seeds"] == [1234, 1235, 1236, 1237]
    assert job["model"] == "demo-tiny"
    assert job["model_hash"] and len(job["model_hash"]) == 10
    assert job["started_at"] and job["finished_at"]
    assert job["params"]["sampler_name"] == "Euler a"
    assert [img["index"] for img in job["images"]] == [0, 1, 2, 3]
    for img in job["images"]:
        png = fetch_png(img["url"])
        assert png.size == (64, 64)
        text = png.info["parameters"]
        assert text == img["infotext"]
        parsed = parse_infotext(text)
        assert parsed["Prompt"] == body["prompt"]
        assert parsed["Negative prompt"] == "blurry"
        assert str(parsed["Seed"]) == str(img["seed"])
        assert str(parsed["Steps"]) == "3"
        assert parsed["Sampler"] == "Euler a"
        assert str(parsed["CFG scale"]) == "6.5"
        assert str(parsed["Size-1"]) == "64" and str(parsed["Size-2"]) == "64"
        assert parsed["Model hash"] == job["model_hash"]
        assert parsed["Model"] == "demo-tiny"


def test_random_seed_is_recorded_and_reproducible(farm: Farm) -> None:
    first = farm.wait_for(farm.submit({"prompt": "a cat", "seed": -1, **TINY})["id"])
    seed = first["params"]["seed"]
    assert 0 <= seed < 2**32 - 1
    assert first["images"][0]["seed"] == seed
    again = farm.wait_for(farm.submit({"prompt": "a cat", "seed": seed, **TINY})["id"])
    a = fetch_png(first["images"][0]["url"]).tobytes()
    b = fetch_png(again["images"][0]["url"]).tobytes()
    assert a == b, "the same seed and parameters must give the same pixels"
    other = farm.wait_for(farm.submit({"prompt": "a cat", "seed": seed + 1, **TINY})["id"])
    assert fetch_png(other["images"][0]["url"]).tobytes() != a


def test_jobs_are_private_to_their_owner(farm: Farm) -> None:
    alice = make_key(farm.env["DATABASE_URL"], f"alice-{uuid.uuid4().hex[:6]}")
    bob = make_key(farm.env["DATABASE_URL"], f"bob-{uuid.uuid4().hex[:6]}")
    job = farm.submit({"prompt": "alice's", **TINY}, key=alice)
    with farm.client(bob) as c:
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert c.get("/v1/jobs").json()["total"] == 0
    with farm.client(alice) as c:
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 200
        listed = c.get("/v1/jobs").json()
        assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    farm.wait_for(job["id"], key=alice)


def test_list_is_newest_first_paginated_and_filterable(farm: Farm) -> None:
    owner = make_key(farm.env["DATABASE_URL"], f"lister-{uuid.uuid4().hex[:6]}")
    ids = [farm.submit({"prompt": f"n{i}", **TINY}, key=owner)["id"] for i in range(3)]
    for job_id in ids:
        farm.wait_for(job_id, key=owner)
    with farm.client(owner) as c:
        page1 = c.get("/v1/jobs", params={"limit": 2}).json()
        page2 = c.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
        assert page1["total"] == 3
        assert [j["id"] for j in page1["jobs"] + page2["jobs"]] == list(reversed(ids))
        assert c.get("/v1/jobs", params={"status": "succeeded"}).json()["total"] == 3
        assert c.get("/v1/jobs", params={"status": "failed"}).json()["total"] == 0
        assert c.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_models_health_and_readiness(farm: Farm) -> None:
    with farm.client() as c:
        models = c.get("/v1/models").json()
        assert [m["name"] for m in models] == ["demo-tiny"]
        assert models[0]["default"] is True and len(models[0]["hash"]) == 10
        assert models[0]["title"] == f"demo-tiny.safetensors [{models[0]['hash']}]"
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert httpx.get(farm.base_url + "/v1/jobs").status_code == 401
    assert httpx.get(farm.base_url + "/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_openapi_is_served(farm: Farm) -> None:
    spec = httpx.get(farm.base_url + "/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    assert httpx.get(farm.base_url + "/docs").status_code == 200
