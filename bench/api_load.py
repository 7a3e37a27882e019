"""The gateway under load: requests/s and latency of its hot routes side by side, and what each request costs.

Load: the API (one uvicorn process, as ``make up`` runs it) against its own PostgreSQL and Redis, no worker (queued
jobs stay queued, so nothing else competes for the CPU). For each route, ``--connections`` concurrent clients send
requests for ``--seconds``; requests/s, p50 and p95, and the ratio of requests/s to ``/healthz`` in the same run.
The client runs on the same machine, so the ratios are what to compare across changes.

Profile: the same requests in process (httpx's ASGI transport against ``api.main.app``), counting the SQL
statements and database round trips (transactions) each one makes, and its Python time.

    .venv/bin/python -m bench.api_load                 # 16 connections, 6 s per route
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bench_farm import KEY, models_folder, start_servers
from bench.overhead import machine
from tests.farm_harness import start_api

JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}


def routes(job_id: str) -> dict[str, tuple[str, str, dict[str, Any] | None]]:
    return {
        "GET /healthz": ("GET", "/healthz", None),
        "GET /v1/jobs/{id}": ("GET", f"/v1/jobs/{job_id}", None),
        "GET /v1/jobs": ("GET", "/v1/jobs?limit=20", None),
        "POST /v1/jobs": ("POST", "/v1/jobs", JOB),
        "GET /sdapi/v1/progress": ("GET", "/sdapi/v1/progress", None),
    }


async def _load(base: str, method: str, path: str, body: dict[str, Any] | None, connections: int,
                seconds: float) -> tuple[int, list[float], int]:
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
                response = await client.request(method, path, json=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 400:
                    errors += 1

        await asyncio.gather(*(one_client() for _ in range(connections)))
    return len(latencies), latencies, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def profile(env: dict[str, str], job_id: str, repeats: int) -> dict[str, tuple[float, float, float]]:
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
            for name, (method, path, body) in routes(job_id).items():
                samples = []
                for _ in range(repeats):
                    counts.update(statements=0, transactions=0)
                    started = time.perf_counter()
                    await client.request(method, path, json=body)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models, _ = models_folder(work, None)
        servers = start_servers(work, models, threads=1)
        logs = work / "logs"
        logs.mkdir()
        api, base = start_api(servers.env, logs)
        try:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
                job_id = client.post("/v1/jobs", json=JOB).json()["id"]
            results: dict[str, tuple[float, float, float, int]] = {}
            for name, (method, path, body) in routes(job_id).items():
                count, latencies, errors = asyncio.run(
                    _load(base, method, path, body, args.connections, args.seconds))
                results[name] = (count / args.seconds, percentile(latencies, 50) * 1000,
                                 percentile(latencies, 95) * 1000, errors)
            costs = profile(servers.env, job_id, args.repeats)
        finally:
            api.stop()
            servers.stop()
    healthz = results["GET /healthz"][0]
    print(f"machine: {machine()}; {args.connections} connections, {args.seconds:.0f} s per route, one API process")
    print("| route | requests/s | p50 ms | p95 ms | vs /healthz | errors | SQL statements | transactions | "
          "in-process ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (rps, p50, p95, errors) in results.items():
        statements, transactions, ms = costs[name]
        print(f"| `{name}` | {rps:.0f} | {p50:.1f} | {p95:.1f} | {rps / healthz:.2f} | {errors} | {statements:.0f} | "
              f"{transactions:.0f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
