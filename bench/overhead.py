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
import sys
import tempfile
import time
from pathlib import Path

import httpx

from shared.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from tests.farm_harness import ROOT, start_api, start_worker

KEY = "rf_bench_admin_key_0123456789abcdefgh"


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


def farm_times(base: str, body: dict, jobs: int, poll: float) -> list[float]:
    times = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        for i in range(jobs + 1):  # the first job is a warm-up and not counted
            start = time.perf_counter()
            job_id = client.post("/v1/jobs", json=dict(body, seed=1000 + i)).json()["id"]
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(poll)
            elapsed = time.perf_counter() - start
            assert job["status"] == "succeeded", job
            if i:
                times.append(elapsed)
    return times


def direct_times(checkpoint: Path, body: dict, jobs: int, threads: int) -> list[float]:
    import torch

    from worker.pipelines.checkpoint_loader import load_pipeline
    from worker.pipelines.txt2img import render_txt2img
    from worker.runtime import pick_device

    if threads:
        torch.set_num_threads(threads)
    device, dtype = pick_device("auto")
    pipe = load_pipeline(checkpoint, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.scheduler.config)
    params = {"negative_prompt": "", "batch_size": 1, "n_iter": 1, "scheduler": "Automatic", **body}
    times = []
    for i in range(jobs + 1):
        start = time.perf_counter()
        render_txt2img(pipe, dict(params, seed=1000 + i), config)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    del pipe
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--checkpoint", type=Path, help="a .safetensors checkpoint (default: the demo model)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RENDERFARM_TORCH_THREADS", "0")))
    parser.add_argument("--poll", type=float, default=0.01, help="poll interval, seconds")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    models = work / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    if args.checkpoint:
        (models / "Stable-diffusion" / args.checkpoint.name).symlink_to(args.checkpoint.resolve())
    else:
        subprocess.run([sys.executable, "-m", "worker.demo_model", str(models)], cwd=ROOT, check=True)
    checkpoint = next((models / "Stable-diffusion").glob("*.safetensors"))
    body = {"prompt": "a lighthouse at dusk, masterpiece", "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": args.sampler, "cfg_scale": 7.0}

    os.environ["RENDERFARM_PG_FSYNC_OFF"] = "1"
    pg = EmbeddedPostgres(work / "pg", free_port()).start()
    rd = EmbeddedRedis(work / "redis", free_port(), persist=False).start()
    from shared.migrate import upgrade

    upgrade(pg.url)
    env = dict(os.environ, DATABASE_URL=pg.url, REDIS_URL=rd.url, STORAGE_URL=str(work / "objects"),
               RENDERFARM_MODELS_DIR=str(models), RENDERFARM_ADMIN_KEY=KEY, HF_HUB_OFFLINE="1",
               RENDERFARM_TORCH_THREADS=str(args.threads))
    procs = []
    try:
        api, base = start_api(env, work)
        procs.append(api)
        procs.append(start_worker(env, work, timeout=600))
        farm = farm_times(base, body, args.jobs, args.poll)
    finally:
        for proc in reversed(procs):
            proc.stop()
        rd.stop()
        pg.stop()
    direct = direct_times(checkpoint, {k: v for k, v in body.items()}, args.jobs, args.threads)
    shutil.rmtree(work, ignore_errors=True)

    f_med, d_med = statistics.median(farm), statistics.median(direct)
    print(f"machine: {machine()}")
    print(f"model: {checkpoint.name}, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, {args.jobs} jobs")
    print(f"{'':24}{'median s':>10}{'mean s':>10}{'min s':>10}")
    print(f"{'direct (in-process)':24}{d_med:10.4f}{statistics.mean(direct):10.4f}{min(direct):10.4f}")
    print(f"{'farm (POST->succeeded)':24}{f_med:10.4f}{statistics.mean(farm):10.4f}{min(farm):10.4f}")
    print(f"ratio farm/direct (median): {f_med / d_med:.3f}x; overhead: {(f_med - d_med) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
