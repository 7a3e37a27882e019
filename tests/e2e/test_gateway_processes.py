"""The API served by two uvicorn worker processes (issue 20): the job path end to end, with long-polls and ETags,
the SSE stream, the WebUI API and Idempotency-Key under concurrency all work whichever process answers.

The processes are started as `make up` starts them (a listening socket each, SO_REUSEPORT); the kernel spreads
connections across them, so both serve.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from devtools.api_processes import reuse_port_sockets, serve_command
from devtools.embedded import EmbeddedPostgres, free_port
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env
from tests.farm_harness import ROOT, Farm, Proc, start_worker, wait_until

pytestmark = pytest.mark.e2e
PROCESSES = 2
SMALL = {"prompt": "two gateways", "width": 64, "height": 64, "steps": 2}


def start_api_processes(env: dict[str, str], log_dir: Path, processes: int) -> tuple[list[Proc], str]:
    """``processes`` API processes on one port as `make up` runs them: a listening socket each (SO_REUSEPORT,
    devtools/api_processes.py)."""
    port = free_port()
    env = dict(env, RENDERFARM_PUBLIC_URL=f"http://127.0.0.1:{port}")
    procs = []
    for index, sock in enumerate(reuse_port_sockets("127.0.0.1", port, processes)):
        log_path = log_dir / f"api{index + 1}.log"
        popen = subprocess.Popen(serve_command(sock), cwd=ROOT, env=env, stdout=open(log_path, "wb"),
                                 stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(sock.fileno(),))
        sock.close()
        procs.append(Proc(f"api{index + 1}", popen, log_path))
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.log()}")
        return all("Application startup complete" in proc.log() for proc in procs)

    try:
        wait_until(up, 90, message=f"{processes} API processes")
    except BaseException:
        for proc in procs:
            proc.stop(signal.SIGKILL, timeout=10)
        raise
    return procs, base


@pytest.fixture(scope="module")
def farm2(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    logs = tmp_path_factory.mktemp("farm-2api")
    env = farm_env(database_url=_fresh_database(postgres, "farm_2api"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY)
    apis, base_url = start_api_processes(env, logs, PROCESSES)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=list(apis))
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
    apis = [proc for proc in farm2.procs if proc.name.startswith("api")]
    assert len(apis) == PROCESSES and all("Started server process" in proc.log() for proc in apis)


def test_each_process_listens_on_a_socket_of_its_own_and_both_serve(farm2: Farm) -> None:
    """Each API process has its own listening socket on the port (SO_REUSEPORT: the kernel spreads connections
    across them by address). With uvicorn's `--workers` they share one socket, and under load the process that
    wakes first accepts every waiting connection: wrk's sixteen kept-alive connections all went to one process
    and the other sat idle. Sixteen clients that keep their connections open are served by both."""
    import psutil

    port = int(farm2.base_url.rsplit(":", 1)[1])
    apis = [proc for proc in farm2.procs if proc.name.startswith("api")]

    def listening_inodes(pid: int) -> set[int]:
        return {os.stat(f"/proc/{pid}/fd/{conn.fd}").st_ino for conn in psutil.Process(pid).net_connections("tcp")
                if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN}

    sockets = [listening_inodes(proc.popen.pid) for proc in apis]
    assert all(len(inodes) == 1 for inodes in sockets) and len(set().union(*sockets)) == len(apis), sockets
    clients = [httpx.Client(base_url=farm2.base_url, timeout=30) for _ in range(16)]
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert all(code == 200 for code in pool.map(lambda c: c.get("/healthz").status_code, clients))
        served = {proc.name: sum(1 for conn in psutil.Process(proc.popen.pid).net_connections("tcp")
                                 if conn.laddr and conn.laddr.port == port and conn.raddr
                                 and conn.status == psutil.CONN_ESTABLISHED) for proc in apis}
        assert sum(served.values()) == 16 and all(count > 0 for count in served.values()), served
    finally:
        for client in clients:
            client.close()


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
