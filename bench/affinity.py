"""Routing by model affinity vs plain round robin: two workers, two checkpoints, an interleaved stream.

Each worker has room for one model (RENDERFARM_PIPELINE_CACHE_MODELS=1, the situation of SDXL-size
models on one GPU); w1 preloads A and w2 preloads B. The stream (each job's model drawn at random,
half A and half B, and its step count between half and twice --steps, from a fixed seed, so both
modes get the same stream) is submitted at once, then the farm drains it. Round robin: both workers
read one shared queue, so a job often finds the other model loaded and pays a load. Affinity: each
job goes to the queue of its model's holder.
Reported per mode: model loads during the run (preloads excluded), wall time, jobs per minute.

    .venv/bin/python -m bench.affinity --jobs 32 --steps 10                      # CPU, demo models
    .venv/bin/python -m bench.affinity --checkpoint-a a.safetensors --checkpoint-b b.safetensors --size 512
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.bench_farm import KEY, start_servers
from bench.overhead import machine
from tests.farm_harness import ROOT, start_api, start_worker


def two_models(work: Path, a: Path | None, b: Path | None) -> Path:
    models = work / "models"
    folder = models / "Stable-diffusion"
    folder.mkdir(parents=True)
    if a and b:
        (folder / "A.safetensors").symlink_to(a.resolve())
        (folder / "B.safetensors").symlink_to(b.resolve())
        return models
    script = ("import sys; from pathlib import Path; from devtools.demo_models.sd15 import build_demo_checkpoint; "
              "f = Path(sys.argv[1]); build_demo_checkpoint(f / 'A.safetensors', seed=0); "
              "build_demo_checkpoint(f / 'B.safetensors', seed=1)")
    subprocess.run([sys.executable, "-c", script, str(folder)], cwd=ROOT, check=True)
    return models


def stream(args: argparse.Namespace) -> list[tuple[str, int]]:
    rng = random.Random(args.seed)
    models = ["A", "B"] * (args.jobs // 2) + ["A"] * (args.jobs % 2)
    rng.shuffle(models)
    return [(model, rng.randint(max(1, args.steps // 2), args.steps * 2)) for model in models]


def model_loads(client: httpx.Client) -> int:
    workers = client.get("/v1/admin/workers").json()["workers"]
    return sum(int(w["model_loads"] or 0) for w in workers if w["state"] != "lost")


def run_mode(models: Path, affinity: bool, args: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-affinity-{'aff' if affinity else 'rr'}-"))
    servers = start_servers(work, models, args.threads)
    env = dict(servers.env, RENDERFARM_AFFINITY_ROUTING="true" if affinity else "false",
               RENDERFARM_PIPELINE_CACHE_MODELS="1", RENDERFARM_DEFAULT_MODEL="A",
               RENDERFARM_AFFINITY_MAX_WAIT_SECONDS=str(args.max_wait))
    procs = []
    try:
        api, base = start_api(env, work)
        procs.append(api)
        procs.append(start_worker(dict(env, RENDERFARM_WORKER_MODELS="A"), work, name="w1", timeout=600))
        procs.append(start_worker(dict(env, RENDERFARM_WORKER_MODELS="B"), work, name="w2", timeout=600))
        time.sleep(2.0)  # the workers' parents start consuming their models' queues within a second
        body = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "sampler_name": "Euler a"}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            before = model_loads(client)
            start = time.perf_counter()
            ids = [client.post("/v1/jobs", json=dict(body, model=model, steps=steps, seed=i)).json()["id"]
                   for i, (model, steps) in enumerate(stream(args))]
            pending = set(ids)
            while pending:
                for job_id in list(pending):
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    if job["status"] in ("succeeded", "failed", "canceled"):
                        assert job["status"] == "succeeded", job
                        pending.discard(job_id)
                time.sleep(0.05)
            wall = time.perf_counter() - start
            time.sleep(1.0)  # the last load's heartbeat
            loads = model_loads(client) - before
        return {"loads": loads, "wall": wall, "jobs_per_min": args.jobs / wall * 60}
    finally:
        for proc in reversed(procs):
            proc.stop()
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--max-wait", type=float, default=15.0, help="affinity deferral bound, seconds")
    parser.add_argument("--seed", type=int, default=0, help="the stream's seed")
    parser.add_argument("--checkpoint-a", type=Path)
    parser.add_argument("--checkpoint-b", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-affinity-models-"))
    try:
        models = two_models(work, args.checkpoint_a, args.checkpoint_b)
        results = {name: run_mode(models, affinity, args)
                   for name, affinity in (("round robin", False), ("affinity", True))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}; {args.jobs} jobs, A and B shuffled, {args.size}x{args.size}, "
          f"{args.steps // 2}-{args.steps * 2} steps, 2 workers with room for one model each")
    print("| routing | model loads | wall (s) | jobs/min |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['loads']} | {r['wall']:.1f} | {r['jobs_per_min']:.1f} |")
    ratio = results["affinity"]["jobs_per_min"] / results["round robin"]["jobs_per_min"]
    print(f"throughput ratio affinity / round robin: {ratio:.2f}x")


if __name__ == "__main__":
    main()
