"""Routing by model affinity with two real worker processes, each with room for one model.

w1 preloads model A, w2 model B (a pipeline cache budget of one tiny model each). Jobs for A must
run on w1 and jobs for B on w2 without any new model load; a job whose model's holder is busy
waits at most the deferral bound, then another worker loads the model and renders it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from devtools.embedded import EmbeddedPostgres
from shared.queueing.routing import model_queue
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env
from tests.farm_harness import ROOT, Farm, Proc, start_api, start_worker, wait_until

pytestmark = pytest.mark.e2e

MODEL_A, MODEL_B, MODEL_XL = "tiny-a", "tiny-b", "tiny-xl"
SHORT = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
LONG = {"prompt": "a long render", "width": 256, "height": 256, "steps": 150, "sampler_name": "Euler"}
ONE_TINY_MODEL = 24_000_000  # bytes: the demo model takes ~16 MB loaded in float32; two do not fit


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("affinity-models")
    script = (
        "import sys; from pathlib import Path; from devtools.demo_models.sd15 import build_demo_checkpoint; "
        "root = Path(sys.argv[1]) / 'Stable-diffusion'; "
        f"build_demo_checkpoint(root / '{MODEL_A}.safetensors', seed=0); "
        f"build_demo_checkpoint(root / '{MODEL_B}.safetensors', seed=1); "
        "from devtools.demo_models.sdxl import build_demo_sdxl_checkpoint; "
        f"build_demo_sdxl_checkpoint(root / '{MODEL_XL}.safetensors')"
    )
    subprocess.run([sys.executable, "-c", script, str(models)], cwd=ROOT, check=True)
    return models


@pytest.fixture(scope="module")
def affinity_farm(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], two_models: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Farm, Proc, Proc]]:
    logs = tmp_path_factory.mktemp("affinity")
    env = farm_env(
        database_url=_fresh_database(postgres, "farm_affinity"),
        redis_url=redis_db_url(),
        storage_url=str(logs / "objects"), models_dir=two_models, admin_key=ADMIN_KEY,
        RENDERFARM_DEFAULT_MODEL=MODEL_A, RENDERFARM_PIPELINE_CACHE_BYTES=str(ONE_TINY_MODEL),
        RENDERFARM_AFFINITY_MAX_WAIT_SECONDS="2",
    )
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    try:
        w1 = start_worker(dict(env, RENDERFARM_WORKER_MODELS=MODEL_A), logs, name="w1")
        farm.procs.append(w1)
        w2 = start_worker(dict(env, RENDERFARM_WORKER_MODELS=MODEL_B), logs, name="w2")
        farm.procs.append(w2)
        for proc, model in ((w1, MODEL_A), (w2, MODEL_B)):
            wait_until(lambda p=proc, m=model: f"Started consuming from {model_queue(m)}" in p.log(), 30,
                       message=f"{proc.name} to consume {model}'s queue")
        yield farm, w1, w2
    finally:
        farm.stop()


def job_rows(farm: Farm, ids: list[str]) -> dict[str, dict]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM jobs WHERE id::text = ANY(:ids)"), {"ids": ids})
        found = {str(row.id): dict(row._mapping) for row in rows}
    engine.dispose()
    return found


def model_loads(farm: Farm) -> dict[str, int]:
    with farm.client() as c:
        workers = c.get("/v1/admin/workers").json()["workers"]
    return {w["name"].split(":")[0]: w["model_loads"] for w in workers if w["state"] != "lost"}


def test_jobs_go_to_the_worker_that_holds_their_model(affinity_farm: tuple[Farm, Proc, Proc]) -> None:
    farm, _, _ = affinity_farm
    assert model_loads(farm) == {"w1": 1, "w2": 1}
    jobs = [farm.submit(dict(SHORT, model=MODEL_A if i % 2 == 0 else MODEL_B, seed=i)) for i in range(8)]
    for job in jobs:
        assert farm.wait_for(job["id"])["status"] == "succeeded"
    rows = job_rows(farm, [job["id"] for job in jobs])
    for job in jobs:
        row = rows[job["id"]]
        expected = "w1:" if row["model_name"] == MODEL_A else "w2:"
        assert row["lease_owner"].startswith(expected), (row["model_name"], row["lease_owner"], row["route"])
        assert row["route"] == model_queue(row["model_name"])
    # An interleaved stream cost no model load at all: each worker kept the model it started with.
    assert model_loads(farm) == {"w1": 1, "w2": 1}
    with farm.client() as c:
        workers = c.get("/v1/admin/workers").json()["workers"]
    for worker in (w for w in workers if w["state"] != "lost"):  # the cache's use against its budget
        assert 0 < worker["memory"]["models_loaded"] <= worker["memory"]["models_budget"] == ONE_TINY_MODEL


def test_a_job_waits_for_a_busy_holder_only_a_bounded_time(affinity_farm: tuple[Farm, Proc, Proc]) -> None:
    farm, _, _ = affinity_farm
    long = farm.submit(dict(LONG, model=MODEL_A, seed=1))
    farm.wait_for(long["id"], statuses=("running",))
    short = farm.submit(dict(SHORT, model=MODEL_A, seed=2))
    assert farm.wait_for(short["id"])["status"] == "succeeded"
    rows = job_rows(farm, [long["id"], short["id"]])
    assert rows[long["id"]]["status"] == "running", "the long job should still be rendering on w1"
    assert rows[long["id"]]["lease_owner"].startswith("w1:")
    # w1 was busy: after the deferral bound the job went to the shared queue and w2 loaded model A for it.
    assert rows[short["id"]]["lease_owner"].startswith("w2:")
    assert rows[short["id"]]["route"] == "render"
    assert model_loads(farm)["w2"] == 2
    assert farm.wait_for(long["id"], timeout=300)["status"] == "succeeded"

    # w2 had room for one model, so B was evicted: a B job is now cold, goes to the shared queue, and
    # whichever worker takes it loads B. Nothing starves.
    cold = farm.submit(dict(SHORT, model=MODEL_B, seed=3))
    assert farm.wait_for(cold["id"])["status"] == "succeeded"
    assert job_rows(farm, [cold["id"]])[cold["id"]]["route"] == "render"


def test_an_sdxl_checkpoint_renders_through_the_farm(affinity_farm: tuple[Farm, Proc, Proc]) -> None:
    farm, _, _ = affinity_farm
    with farm.client() as c:
        listed = {m["name"]: m for m in c.get("/v1/models").json()}
    assert listed[MODEL_XL]["architecture"] == "demo-tiny-sdxl"
    job = farm.submit(dict(SHORT, model=MODEL_XL, seed=7, prompt="a (red:1.2) boat", negative_prompt="blurry"))
    done = farm.wait_for(job["id"])
    assert done["status"] == "succeeded", done
    with farm.client() as c:
        image = c.get(done["images"][0]["url"])
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Model: {MODEL_XL}" in done["images"][0]["infotext"]
    assert job_rows(farm, [job["id"]])[job["id"]]["route"] == "render"  # nobody held it: the shared queue
