"""What one request of each hot gateway route costs in CPU, per process: the API's, PostgreSQL's, Redis's and wrk's.

On a machine whose cores are shared by the API, its database and the load generator, requests/s move with
whatever else runs; CPU milliseconds per request do not, and they say where a route's cost lies (Python or the
database). For each route, wrk (2 threads, 16 connections) runs against one API process of its own (its own
PostgreSQL and Redis, no worker, the rate limit and queued cap lifted so POSTs are measured and not refused), and
the CPU time every process tree used during the run (/proc: user + system, children included) is divided by the
requests served.

    .venv/bin/python -m bench.gateway_cpu                  # healthz, job GET, 304, list, WebUI progress, POST
    .venv/bin/python -m bench.gateway_cpu --backlog 10     # after 10 s of POSTs have queued a few thousand jobs

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.api_load import JOB, process_tree, start_api_processes
from bench.bench_farm import KEY, models_folder, start_servers
from bench.overhead import machine

POST_SCRIPT = (f'wrk.method = "POST"\nwrk.body = \'{json.dumps(JOB)}\'\n'
               'wrk.headers["Content-Type"] = "application/json"\n')
LIFTED = {"RENDERFARM_DEFAULT_MAX_QUEUED": "0", "RENDERFARM_DEFAULT_RATE_BURST": "1000000",
          "RENDERFARM_DEFAULT_RATE_PER_SECOND": "1000000"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants, each with its reaped children."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def wrk(url: str, seconds: float, headers: dict[str, str], script: Path | None = None) -> subprocess.Popen[str]:
    args = ["wrk", "-t2", "-c16", f"-d{seconds:.0f}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    if script is not None:
        args += ["-s", str(script)]
    return subprocess.Popen([*args, url], stdout=subprocess.PIPE, text=True)


def _latency_ms(out: str, percent: int) -> float:
    found = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if not found:
        return float("nan")
    value, unit = float(found.group(1)), found.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def measure(url: str, seconds: float, headers: dict[str, str], pids: dict[str, int],
            script: Path | None = None) -> dict[str, float]:
    """Requests/s, p90 (wrk's --latency prints 50/75/90/99) and CPU ms per request of each process."""
    load = wrk(url, seconds + 2, headers, script)
    time.sleep(1)  # connections open, the first requests served
    pids = {**pids, "wrk": load.pid}
    before, started = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
    time.sleep(seconds)
    after, elapsed = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic() - started
    out = load.communicate()[0]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rate, "p90": _latency_ms(out, 90), "errors": float(errors.group(1)) if errors else 0.0,
            **{name: (after[name] - before[name]) / (rate * elapsed) * 1000 for name in pids}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per route")
    parser.add_argument("--backlog", type=float, default=0.0, help="seconds of POSTs to queue jobs first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models, _ = models_folder(work, None)
        servers = start_servers(work, models, threads=1)
        (work / "logs").mkdir()
        api, base = start_api_processes({**servers.env, **LIFTED}, work / "logs", 1)
        post = work / "post.lua"
        post.write_text(POST_SCRIPT)
        auth = {"Authorization": f"Bearer {KEY}"}
        try:
            job_id = httpx.post(f"{base}/v1/jobs", json=JOB, headers=auth).json()["id"]
            if args.backlog:
                wrk(f"{base}/v1/jobs", args.backlog, auth, post).communicate()
                import sqlalchemy as sa

                engine = sa.create_engine(servers.env["DATABASE_URL"], isolation_level="AUTOCOMMIT")
                with engine.connect() as conn:
                    conn.exec_driver_sql("VACUUM ANALYZE")  # as autovacuum would soon: not during the runs
                engine.dispose()
            queued = httpx.get(f"{base}/v1/jobs", params={"status": "queued", "limit": 1}, headers=auth).json()["total"]
            etag = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth).headers["ETag"]
            assert servers.postgres.proc is not None and servers.redis.proc is not None
            pids = {"api": api.popen.pid, "postgres": servers.postgres.proc.pid, "redis": servers.redis.proc.pid}
            routes: list[tuple[str, str, dict[str, str], Path | None]] = [
                ("GET /healthz", "/healthz", auth, None),
                ("GET /v1/jobs/{id}", f"/v1/jobs/{job_id}", auth, None),
                ("GET /v1/jobs/{id} (304)", f"/v1/jobs/{job_id}", {**auth, "If-None-Match": etag}, None),
                ("GET /v1/jobs", "/v1/jobs?limit=20", auth, None),
                ("GET /sdapi/v1/progress", "/sdapi/v1/progress", auth, None),
                ("POST /v1/jobs", "/v1/jobs", auth, post),  # last: the jobs it queues weigh on the others
            ]
            results = {name: measure(base + path, args.seconds, headers, pids, script)
                       for name, path, headers, script in routes}
        finally:
            api.stop()
            servers.stop()
    print(f"machine: {machine()}; one API process, wrk 2 threads x 16 connections, {args.seconds:.0f} s per route; "
          f"{queued} jobs queued before the runs")
    print("| route | requests/s | p90 ms | API ms | PostgreSQL ms | Redis ms | wrk ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| `{name}` | {r['rps']:.0f} | {r['p90']:.1f} | {r['api']:.2f} | {r['postgres']:.2f} | "
              f"{r['redis']:.2f} | {r['wrk']:.2f} | {r['errors']:.0f} |")


if __name__ == "__main__":
    main()
