"""WebUI API throughput: 4 concurrent ``POST /sdapi/v1/txt2img`` calls served by 1 vs 2 workers.

The WebUI serializes requests behind one lock; the farm turns each into a job and runs them on as
many workers as it has. Starts its own PostgreSQL, Redis and API, then for each worker count
starts that many warm workers and times rounds of N concurrent calls (wall time of the round,
and each call's latency).

    .venv/bin/python -m bench.sdapi_parallel --rounds 3 --steps 20 --size 64 --threads 1      # CPU
    .venv/bin/python -m bench.sdapi_parallel --checkpoint big.safetensors --size 512 --steps 20  # GPU

On one GPU, two workers share it; the speed-up then shows how much of a job is not GPU-bound.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.bench_farm import KEY, models_folder, start_servers
from bench.overhead import machine
from tests.farm_harness import start_api, start_worker


def call(base: str, body: dict, seed: int) -> float:
    start = time.perf_counter()
    resp = httpx.post(f"{base}/sdapi/v1/txt2img", json=dict(body, seed=seed), auth=("bench", KEY), timeout=900)
    resp.raise_for_status()
    return time.perf_counter() - start


def run_rounds(base: str, body: dict, calls: int, rounds: int) -> tuple[list[float], list[float]]:
    """(round wall times, per-call latencies); the first round warms up and is dropped."""
    walls: list[float] = []
    latencies: list[float] = []
    with ThreadPoolExecutor(calls) as pool:
        for r in range(rounds + 1):
            start = time.perf_counter()
            results = list(pool.map(lambda i: call(base, body, 1000 * r + i), range(calls)))  # noqa: B023
            if r:
                walls.append(time.perf_counter() - start)
                latencies += results
    return walls, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--checkpoint", type=Path, help="a .safetensors checkpoint (default: the demo model)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-sdapi-"))
    models, checkpoint = models_folder(work, args.checkpoint)
    body = {"prompt": "a lighthouse at dusk, masterpiece", "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": "Euler a"}
    servers = start_servers(work, models, args.threads)
    env = servers.env
    results: dict[int, tuple[list[float], list[float]]] = {}
    api = None
    try:
        api, base = start_api(env, work)
        for count in [int(n) for n in args.workers.split(",")]:
            workers = []
            try:
                with ThreadPoolExecutor(count) as pool:
                    workers = list(pool.map(lambda i, n=count: start_worker(env, work, name=f"b{n}x{i}", timeout=600),
                                            range(count)))
                results[count] = run_rounds(base, body, args.calls, args.rounds)
            finally:
                for proc in workers:
                    proc.stop()
    finally:
        if api is not None:
            api.stop()
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)

    name = checkpoint.name
    print(f"machine: {machine()}")
    print(f"model: {name}, {args.size}x{args.size}, {args.steps} steps, Euler a, {args.calls} concurrent calls, "
          f"{args.rounds} rounds (+1 warm-up), torch threads {args.threads or 'default'}")
    print(f"{'workers':>8}{'round wall median s':>22}{'call latency median s':>24}{'images/s':>10}{'speed-up':>10}")
    base_wall = None
    for count, (walls, latencies) in results.items():
        wall = statistics.median(walls)
        base_wall = base_wall or wall
        print(f"{count:>8}{wall:>22.3f}{statistics.median(latencies):>24.3f}{args.calls / wall:>10.2f}"
              f"{base_wall / wall:>9.2f}x")


if __name__ == "__main__":
    main()
