"""Fair share vs first come, first served: a heavy and a light owner sharing two workers (issue 17).

The heavy owner submits a backlog (``--heavy`` jobs) with the queue paused, the light owner then submits a few
(``--light``), and the queue is resumed. Each mode runs on a fresh farm (own PostgreSQL and Redis, one API, two
render workers on the demo model). Reported per mode: the light owner's wait (submit to finish) p50/p95/max,
the heavy owner's, and the wall time of the whole run; the ratio of the light owner's p95 waits. One run per mode,
same machine, so the ratio is what to compare.

    .venv/bin/python -m bench.fairness                      # 200 heavy, 10 light, 64x64, 2 steps, CPU
    .venv/bin/python -m bench.fairness --heavy 100 --steps 4
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from bench.api_load import percentile
from bench.bench_farm import KEY, models_folder, start_servers
from bench.overhead import machine
from tests.conftest import make_key
from tests.farm_harness import start_api, start_worker, wait_until

DONE = ("succeeded", "failed", "canceled")


def run_mode(models: Path, fair: bool, args: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-fairness-{'fair' if fair else 'fifo'}-"))
    servers = start_servers(work, models, args.threads)
    env = dict(servers.env, RENDERFARM_FAIR_SHARE="true" if fair else "false", RENDERFARM_PAUSE_POLL_SECONDS="1")
    procs = []
    try:
        api, base = start_api(env, work)
        procs.append(api)
        procs += [start_worker(env, work, name=f"w{i}", timeout=600) for i in (1, 2)]
        heavy, light = make_key(env["DATABASE_URL"], "heavy"), make_key(env["DATABASE_URL"], "light")
        body = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "steps": args.steps,
                "sampler_name": "Euler"}
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        clients = {owner: httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
                   for owner, key in (("heavy", heavy), ("light", light))}
        submitted: dict[str, tuple[str, float]] = {}
        assert admin.post("/v1/admin/queue/pause").status_code == 200
        for owner, count in (("heavy", args.heavy), ("light", args.light)):
            for i in range(count):
                resp = clients[owner].post("/v1/jobs", json=dict(body, seed=i))
                assert resp.status_code == 202, resp.text
                submitted[resp.json()["id"]] = (owner, time.perf_counter())
        start = time.perf_counter()
        assert admin.post("/v1/admin/queue/resume").status_code == 200
        waits: dict[str, list[float]] = {"heavy": [], "light": []}
        pending = dict(submitted)

        def drained() -> bool:
            for job_id, (owner, sent) in list(pending.items()):
                if clients[owner].get(f"/v1/jobs/{job_id}").json()["status"] in DONE:
                    waits[owner].append(time.perf_counter() - sent)
                    del pending[job_id]
            return not pending

        wait_until(drained, 3600, interval=0.2, message="every job to finish")
        wall = time.perf_counter() - start
        for client in (admin, *clients.values()):
            client.close()
        return {f"{owner}_{name}": percentile(values, q) for owner, values in waits.items()
                for name, q in (("p50", 50), ("p95", 95), ("max", 100))} | {"wall": wall}
    finally:
        for proc in reversed(procs):
            proc.stop()
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heavy", type=int, default=200)
    parser.add_argument("--light", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fairness-models-"))
    try:
        models, _ = models_folder(work, None)
        results = {name: run_mode(models, fair, args) for name, fair in (("first come, first served", False),
                                                                         ("fair share", True))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}; heavy owner {args.heavy} jobs then light owner {args.light}, "
          f"{args.size}x{args.size}, {args.steps} steps, 2 workers, batching on")
    print("| claim order | light p50 (s) | light p95 (s) | light max (s) | heavy p50 (s) | heavy p95 (s) | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['light_p50']:.1f} | {r['light_p95']:.1f} | {r['light_max']:.1f} | {r['heavy_p50']:.1f} "
              f"| {r['heavy_p95']:.1f} | {r['wall']:.1f} |")
    ratio = results["first come, first served"]["light_p95"] / max(results["fair share"]["light_p95"], 1e-9)
    print(f"light owner's p95 wait, first come first served / fair share: {ratio:.1f}x")


if __name__ == "__main__":
    main()
