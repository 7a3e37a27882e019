"""Starts real farm processes for tests: API (uvicorn) and render workers (Celery).

Servers (PostgreSQL, Redis, an S3-compatible server) are started by fixtures in
conftest.py; this module only knows how to run our own processes against them and
how to drive the farm over HTTP the way a user does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from devtools.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def start_api(env: dict[str, str], log_dir: Path, name: str = "api") -> tuple[Proc, str]:
    port = free_port()
    log_path = log_dir / f"{name}.log"
    env = dict(env, RENDERFARM_PUBLIC_URL=f"http://127.0.0.1:{port}")
    popen = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc = Proc(name, popen, log_path)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{proc.log()}")
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _ready_or_killed(proc, lambda: wait_until(up, 60, message=f"{name} to answer /healthz"))
    return proc, base


def _ready_or_killed(proc: Proc, wait: Callable[[], object]) -> None:
    """``wait`` for the process to be ready; one that never is (or a wait interrupted) is killed with its whole
    process group, not left running after the test that started it has failed."""
    try:
        wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()
        raise


def start_worker(env: dict[str, str], log_dir: Path, name: str = "w1", timeout: float = 180,
                 queues: str = "render") -> Proc:
    """A render worker (Celery, one process); ``queues`` "render,train" also takes trainings, "train" only them."""
    log_path = log_dir / f"worker-{name}.log"
    env = dict(env, RENDERFARM_WORKER_NAME=name)
    popen = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "-c", "1",
         "--prefetch-multiplier=1", "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
         "--loglevel=INFO"],
        cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc = Proc(name, popen, log_path)
    client = redis.Redis.from_url(env["REDIS_URL"])

    def ready() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"worker {name} exited:\n{proc.log()}")
        for key in client.scan_iter("renderfarm:workers:*"):
            info = json.loads(client.get(key) or "{}")
            if info.get("name", "").startswith(f"{name}:") and info.get("ready"):
                return True
        return False

    _ready_or_killed(proc, lambda: wait_until(ready, timeout, interval=0.2, message=f"worker {name} to report ready"))
    return proc


def start_webhook_worker(env: dict[str, str], log_dir: Path, name: str = "webhooks") -> Proc:
    """The webhook sender: a separate light Celery app on its own queue (no torch)."""
    log_path = log_dir / f"{name}.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.webhook_sender.app", "worker", "-Q", "webhooks", "-c", "2",
         "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "--loglevel=INFO"],
        cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc = Proc(name, popen, log_path)

    def ready() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"webhook worker exited:\n{proc.log()}")
        return " ready." in proc.log()

    _ready_or_killed(proc, lambda: wait_until(ready, 60, message="the webhook worker to start"))
    return proc


@dataclass
class Farm:
    base_url: str
    admin_key: str
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    # Set when the API runs in this process: makes a client (FastAPI's TestClient) from request headers.
    in_process: Callable[[dict[str, str]], httpx.Client] | None = None

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        if self.in_process is not None:
            return self.in_process(headers)
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def anonymous(self) -> httpx.Client:
        """A client that sends no API key."""
        if self.in_process is not None:
            return self.in_process({})
        return httpx.Client(base_url=self.base_url, timeout=30)

    def submit(self, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        with self.client(key) as c:
            resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        return resp.json()

    def wait_for(self, job_id: str, key: str | None = None, timeout: float = 120,
                 statuses: tuple[str, ...] = ("succeeded", "failed", "canceled")) -> dict[str, Any]:
        with self.client(key) as c:
            def done() -> dict[str, Any] | None:
                job = c.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in statuses else None

            try:
                return wait_until(done, timeout, interval=0.1, message=f"job {job_id}")
            except TimeoutError:
                logs = "\n".join(p.log()[-3000:] for p in self.procs)
                raise TimeoutError(f"job {job_id} not finished; logs:\n{logs}") from None

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
