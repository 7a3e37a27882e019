"""Farm overhead: POST-to-`succeeded` (seen by a poller) vs the same render called in-process.

Starts its own PostgreSQL, Redis, API and one warm worker (the same code paths as
`make up`), renders N jobs one at a time through the farm, then N times directly on
the pipeline, and prints both with their ratio.

    .venv/bin/python -m bench.overhead --jobs 10 --steps 20 --size 64          # CPU, demo model
    .venv/bin/python -m bench.overhead --checkpoint big.safetensors --size 512  # GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from bench.bench_farm import KEY, models_folder, start_servers
from tests.farm_harness import start_api, start_worker


def machine() -> str:
    desc = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            desc += f", GPU {out.stdout.strip().splitlines()[0]}"
    except (OSError, subprocess.TimeoutExpired):
        desc += ", no GPU"
    return desc


def farm_job(client: httpx.Client, body: dict, seed: int, poll: float) -> dict[str, float]:
    """One job through the farm, timed as a user sees it, with the job's own timestamps to split it."""
    start = time.perf_counter()
    job_id = client.post("/v1/jobs", json=dict(body, seed=seed)).json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(poll)
    total = time.perf_counter() - start
    assert job["status"] == "succeeded", job

    def ts(name: str) -> datetime:
        return datetime.fromisoformat(job[name])

    return {
        "total": total,
        "queue": (ts("started_at") - ts("created_at")).total_seconds(),
        "worker": (ts("finished_at") - ts("started_at")).total_seconds(),
    }


def pin_processes(pid: int, cores: set[int]) -> None:
    """Pin a process and all its descendants (a Celery worker's render child, PostgreSQL backends)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        proc.cpu_affinity(sorted(cores))


class DirectRenderer:
    """The same render called in-process on the same kind of pipeline, no farm around it."""

    def __init__(self, checkpoint: Path, threads: int) -> None:
        import torch

        from worker.engine.checkpoint_loader import load_pipeline
        from worker.runtime import pick_device

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device, dtype = pick_device("auto")
        self.pipe = load_pipeline(checkpoint, device=self.device, dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.config = dict(self.pipe.scheduler.config)
        from worker.engine.engine import GenerationEngine

        self.engine = GenerationEngine(checkpoint.parent.parent)

    def render(self, body: dict, seed: int) -> float:
        from shared.jobs.contract import RenderSpec
        from shared.jobs.schemas import Txt2ImgRequest, resolve_params

        spec = RenderSpec.from_stored(resolve_params(Txt2ImgRequest(**body, seed=seed), "bench"))
        start = time.perf_counter()
        self.engine.render(self.pipe, spec, self.config)
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--checkpoint", type=Path, help="a .safetensors checkpoint (default: the demo model)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RENDERFARM_TORCH_THREADS", "0")))
    parser.add_argument("--poll", type=float, default=0.01, help="poll interval, seconds")
    parser.add_argument("--pin", action="store_true",
                        help="CPU-only machines: renders (worker and direct) on core 0, everything else on core 1, "
                             "so the comparison measures the farm rather than CPU contention")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    models, checkpoint = models_folder(work, args.checkpoint)
    body = {"prompt": "a lighthouse at dusk, masterpiece", "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": args.sampler, "cfg_scale": 7.0}
    servers = start_servers(work, models, args.threads)
    env = servers.env
    procs = []
    direct: list[float] = []
    farm: list[dict[str, float]] = []
    try:
        api, base = start_api(env, work)
        procs.append(api)
        procs.append(start_worker(env, work, timeout=600))
        if args.pin:
            pin_processes(procs[-1].popen.pid, {0})
            for other in (api.popen.pid, servers.postgres.proc.pid, servers.redis.proc.pid):
                pin_processes(other, {1})
        renderer = DirectRenderer(checkpoint, args.threads)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            for i in range(args.jobs + 1):  # interleaved, so both see the same background load
                if args.pin:
                    os.sched_setaffinity(0, {0})
                d = renderer.render(body, 1000 + i)
                if args.pin:
                    os.sched_setaffinity(0, {1})
                f = farm_job(client, body, 1000 + i, args.poll)
                if i:  # the first pair warms up both sides
                    direct.append(d)
                    farm.append(f)
    finally:
        for proc in reversed(procs):
            proc.stop()
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    totals = [f["total"] for f in farm]
    f_med, d_med = med(totals), med(direct)
    print(f"machine: {machine()}")
    print(f"model: {checkpoint.name}, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, {args.jobs} jobs,"
          f" torch threads {args.threads or 'default'}, poll {args.poll * 1000:.0f} ms, pinned: {args.pin}")
    print(f"{'':34}{'median s':>10}{'mean s':>10}{'min s':>10}")
    print(f"{'direct render (in-process)':34}{d_med:10.4f}{statistics.mean(direct):10.4f}{min(direct):10.4f}")
    print(f"{'farm: POST -> succeeded seen':34}{f_med:10.4f}{statistics.mean(totals):10.4f}{min(totals):10.4f}")
    parts = (("queue", "  of which: queued (created->started)"), ("worker", "  of which: worker (claim->done)"))
    for part, label in parts:
        values = [f[part] for f in farm]
        print(f"{label:34}{med(values):10.4f}{statistics.mean(values):10.4f}{min(values):10.4f}")
    print(f"ratio farm/direct (median): {f_med / d_med:.3f}x; overhead: {(f_med - d_med) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
