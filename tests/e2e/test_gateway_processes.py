"""The API served by two uvicorn worker processes (issue 20): the job path end to end, with long-polls and ETags,
the SSE stream, the WebUI API and Idempotency-Key under concurrency all work whichever process answers.

Requests over separate connections are spread by the kernel across the processes sharing the socket; the test
makes many, so both serve (the log shows two processes started).
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from devtools.embedded import EmbeddedPostgres, free_port
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env
from tests.farm_harness import ROOT, Farm, Proc, start_worker, wait_until

pytestmark = pytest.mark.e2e
PROCESSES = 2
SMALL = {"prompt": "two gateways", "width": 64, "height": 64, "steps": 2}


def start_api_processes(env: dict[str, str], log_dir: Path, processes: int) -> tuple[Proc, str]:
    port = free_port()
    log_path = log_dir / "api.log"
    env = dict(env, RENDERFARM_PUBLIC_URL=f"http://127.0.0.1:{port}")
    popen = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(processes)],
        cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc = Proc("api", popen, log_path)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"api exited:\n{proc.log()}")
        try:
            ok = httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
        return ok and proc.log().count("Application startup complete") >= processes

    wait_until(up, 90, message=f"{processes} API processes")
    return proc, base


@pytest.fixture(scope="module")
def farm2(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    logs = tmp_path_factory.mktemp("farm-2api")
    env = farm_env(database_url=_fresh_database(postgres, "farm_2api"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY)
    api, base_url = start_api_processes(env, logs, PROCESSES)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    try:
        farm.procs.append(start_worker(env, logs))
        yield farm
    finally:
        farm.stop()


def _fresh_client(farm: Farm) -> httpx.Client:
    """A new connection each time: the processes share the listening socket, so clients land on either."""
    return httpx.Client(base_url=farm.base_url, headers={"Authorization": f"Bearer {farm.admin_key}"}, timeout=90,
                        limits=httpx.Limits(max_keepalive_connections=0))


def read_events(farm: Farm, job_id: str) -> list[tuple[str, str, dict]]:
    events, current = [], {}
    with httpx.stream("GET", f"{farm.base_url}/v1/jobs/{job_id}/events",
                      headers={"Authorization": f"Bearer {farm.admin_key}"}, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line:
                if current:
                    events.append((current["id"], current["event"], json.loads(current["data"])))
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return events


def test_two_api_processes_started(farm2: Farm) -> None:
    assert farm2.procs[0].log().count("Started server process") >= PROCESSES


def test_a_job_end_to_end_with_long_polls_etags_and_sse(farm2: Farm) -> None:
    with _fresh_client(farm2) as client:
        resp = client.post("/v1/jobs", json=SMALL)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stream = pool.submit(read_events, farm2, job_id)  # on whichever process takes it
            etag, job, seen = None, resp.json(), []
            for _ in range(200):
                headers = {"If-None-Match": etag} if etag else {}
                answer = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}, headers=headers)
                assert answer.status_code in (200, 304), answer.text
                etag = answer.headers["ETag"]
                if answer.status_code == 200:
                    job = answer.json()
                    seen.append(job["status"])
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
            events = stream.result(timeout=120)
    assert job["status"] == "succeeded", job
    assert len(seen) < 100, seen  # each answer was a change (or a timeout), not a busy loop
    assert events[-1][1] == "succeeded" and events[-1][2]["id"] == job_id
    with _fresh_client(farm2) as client:
        again = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
        assert again.status_code == 304
        image = httpx.get(job["images"][0]["url"], timeout=30)
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_idempotency_under_concurrency_across_processes(farm2: Farm) -> None:
    headers = {"Idempotency-Key": f"two-{uuid.uuid4()}"}

    def post(_: int) -> httpx.Response:
        with _fresh_client(farm2) as client:
            return client.post("/v1/jobs", json={**SMALL, "prompt": "only once"}, headers=headers)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    farm2.wait_for(answers[0].json()["id"])


def test_the_webui_api_through_either_process(farm2: Farm) -> None:
    for _ in range(2):
        with _fresh_client(farm2) as client:
            resp = client.post("/sdapi/v1/txt2img", json={"prompt": "webui", "width": 64, "height": 64, "steps": 2})
            assert resp.status_code == 200, resp.text
            assert len(resp.json()["images"]) == 1
            progress = client.get("/sdapi/v1/progress")
            assert progress.status_code == 200
