"""The gateway under load: requests/s and latency of its hot routes side by side, and what each request costs.

Load: the API (``--processes`` uvicorn processes; 1 by default, as the "before" table was measured; ``make up`` now
runs one per core) against its own PostgreSQL and Redis, no worker (queued jobs stay queued, so nothing else
competes for the CPU). For each route, ``--connections`` concurrent clients send
requests for ``--seconds``; requests/s, p50 and p95, and the ratio of requests/s to ``/healthz`` in the same run.
The client runs on the same machine, so the ratios are what to compare across changes.

Profile: the same requests in process (httpx's ASGI transport against ``api.main.app``), counting the SQL
statements and database round trips (transactions) each one makes, and its Python time.

Long-polls: ``--long-polls N`` clients hold ``GET /v1/jobs/{id}?wait=`` at once (with the job's ETag, so each
waits the whole time); it reports errors, how many came back on time, and the API's OS threads and busy database
connections (not idle in the pool) while they waited.

    .venv/bin/python -m bench.api_load                 # 16 connections, 6 s per route
    .venv/bin/python -m bench.api_load --processes 2 --long-polls 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bench_farm import KEY, models_folder, start_servers
from bench.overhead import machine
from devtools.embedded import free_port
from tests.farm_harness import ROOT, Proc, start_api, wait_until

JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}


Route = tuple[str, str, dict[str, Any] | None, dict[str, str]]


def routes(job_id: str, etag: str) -> dict[str, Route]:
    return {
        "GET /healthz": ("GET", "/healthz", None, {}),
        "GET /v1/jobs/{id}": ("GET", f"/v1/jobs/{job_id}", None, {}),
        "GET /v1/jobs/{id} (If-None-Match: 304)": ("GET", f"/v1/jobs/{job_id}", None, {"If-None-Match": etag}),
        "GET /v1/jobs": ("GET", "/v1/jobs?limit=20", None, {}),
        "POST /v1/jobs": ("POST", "/v1/jobs", JOB, {}),
        "GET /sdapi/v1/progress": ("GET", "/sdapi/v1/progress", None, {}),
    }


def start_api_processes(env: dict[str, str], logs: Path, processes: int) -> tuple[Proc, str]:
    """The API under uvicorn with ``processes`` worker processes (compose's way: one shared listening socket; `make up`
    gives each process its own, devtools/api_processes.py), answering on a free port."""
    if processes <= 1:
        return start_api(env, logs)
    port = free_port()
    log_path = logs / "api.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(processes), "--log-level", "warning"],
        cwd=ROOT, env=dict(env, RENDERFARM_PUBLIC_URL=f"http://127.0.0.1:{port}"), stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc, base = Proc("api", popen, log_path), f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 90, message="the API")
    time.sleep(2)  # every process started
    return proc, base


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a process that exits meanwhile has none)."""
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    return [pid, *(p for kid in kids for p in process_tree(kid))]


def _threads(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                total += int(line.split()[1])
    return total


def _database_connections(env: dict[str, str]) -> int:
    """Connections of the API doing something (in a query or a transaction); idle pooled ones do not count."""
    import sqlalchemy as sa

    engine = sa.create_engine(env["DATABASE_URL"])
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND pid <> pg_backend_pid() AND state <> 'idle'")).scalar_one()
    engine.dispose()
    return int(count)


async def _long_polls(base: str, job_id: str, etag: str, clients: int, wait: float, api_pid: int,
                      env: dict[str, str]) -> dict[str, float]:
    """``clients`` long-polls at once, each on its own connection; the API's threads and DB connections are
    sampled while they wait (and before, idle)."""
    pids = process_tree(api_pid)
    idle_threads, idle_connections = _threads(pids), await asyncio.to_thread(_database_connections, env)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, limits=limits,
                                 timeout=wait + 60) as client:
        async def one() -> tuple[int, float]:
            started = time.perf_counter()
            try:
                resp = await client.get(f"/v1/jobs/{job_id}", params={"wait": wait},
                                        headers={"If-None-Match": etag})
            except httpx.HTTPError:
                return -1, time.perf_counter() - started
            return resp.status_code, time.perf_counter() - started

        tasks = [asyncio.create_task(one()) for _ in range(clients)]
        await asyncio.sleep(wait * 0.9)  # the burst of first reads is over; they all wait
        busy_threads = _threads(process_tree(api_pid))
        busy_connections = await asyncio.to_thread(_database_connections, env)
        results = await asyncio.gather(*tasks)
    on_time = sum(1 for code, elapsed in results if code == 304 and wait - 0.5 <= elapsed <= wait + 10)
    return {"clients": clients, "errors": sum(1 for code, _ in results if code not in (200, 304)),
            "on_time": on_time, "max_s": max(elapsed for _, elapsed in results),
            "threads_idle": idle_threads, "threads_waiting": busy_threads,
            "db_connections_idle": idle_connections, "db_connections_waiting": busy_connections}


async def _load(base: str, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str],
                connections: int, seconds: float) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, limits=limits,
                                 timeout=30) as client:
        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                started = time.perf_counter()
                response = await client.request(method, path, json=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 400:
                    errors += 1

        await asyncio.gather(*(one_client() for _ in range(connections)))
    return len(latencies), latencies, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def profile(env: dict[str, str], job_id: str, etag: str, repeats: int) -> dict[str, tuple[float, float, float]]:
    """(statements, transactions, ms of wall time) per request, in process, median of ``repeats``."""
    import os

    os.environ.update(env)
    from sqlalchemy import event

    from api.main import app
    from shared.db.session import get_engine

    engine = get_engine()
    counts = {"statements": 0, "transactions": 0}

    def on_statement(*_: Any) -> None:
        counts["statements"] += 1

    def on_begin(*_: Any) -> None:
        counts["transactions"] += 1

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "begin", on_begin)
    out: dict[str, tuple[float, float, float]] = {}

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
            for name, (method, path, body, headers) in routes(job_id, etag).items():
                samples = []
                for _ in range(repeats):
                    counts.update(statements=0, transactions=0)
                    started = time.perf_counter()
                    await client.request(method, path, json=body, headers=headers)
                    samples.append((counts["statements"], counts["transactions"],
                                    (time.perf_counter() - started) * 1000))
                out[name] = tuple(statistics.median(s[i] for s in samples) for i in range(3))  # type: ignore[assignment]

    asyncio.run(run())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--processes", type=int, default=1, help="uvicorn worker processes of the API")
    parser.add_argument("--long-polls", type=int, default=0, help="clients long-polling at once (0: skip)")
    parser.add_argument("--long-poll-wait", type=float, default=10.0)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models, _ = models_folder(work, None)
        servers = start_servers(work, models, threads=1)
        logs = work / "logs"
        logs.mkdir()
        api, base = start_api_processes(servers.env, logs, args.processes)
        polls: dict[str, float] | None = None
        try:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
                job_id = client.post("/v1/jobs", json=JOB).json()["id"]
                etag = client.get(f"/v1/jobs/{job_id}").headers.get("ETag", "")
            results: dict[str, tuple[float, float, float, int]] = {}
            for name, (method, path, body, headers) in routes(job_id, etag).items():
                count, latencies, errors = asyncio.run(
                    _load(base, method, path, body, headers, args.connections, args.seconds))
                results[name] = (count / args.seconds, percentile(latencies, 50) * 1000,
                                 percentile(latencies, 95) * 1000, errors)
            if args.long_polls:
                with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
                    etag = client.get(f"/v1/jobs/{job_id}").headers.get("ETag", "")
                polls = asyncio.run(_long_polls(base, job_id, etag, args.long_polls, args.long_poll_wait,
                                                api.popen.pid, servers.env))
            costs = profile(servers.env, job_id, etag, args.repeats)
        finally:
            api.stop()
            servers.stop()
    healthz = results["GET /healthz"][0]
    print(f"machine: {machine()}; {args.connections} connections, {args.seconds:.0f} s per route, "
          f"{args.processes} API process(es); load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print("| route | requests/s | p50 ms | p95 ms | vs /healthz | errors | SQL statements | transactions | "
          "in-process ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (rps, p50, p95, errors) in results.items():
        statements, transactions, ms = costs[name]
        print(f"| `{name}` | {rps:.0f} | {p50:.1f} | {p95:.1f} | {rps / healthz:.2f} | {errors} | {statements:.0f} | "
              f"{transactions:.0f} | {ms:.1f} |")
    if polls is not None:
        print(f"long-polls: {polls['clients']:.0f} clients, wait {args.long_poll_wait:.0f} s: {polls['errors']:.0f} "
              f"errors, {polls['on_time']:.0f} answered 304 on time (slowest {polls['max_s']:.1f} s); API threads "
              f"{polls['threads_idle']:.0f} idle -> {polls['threads_waiting']:.0f} while waiting; database "
              f"connections busy {polls['db_connections_idle']:.0f} -> {polls['db_connections_waiting']:.0f}")


if __name__ == "__main__":
    main()
