"""Batching: images/s and latency of a farm with one warm worker, batching off vs on, and the engine alone.

Farm: 24 one-image jobs with one batch key (different prompts, seeds and CFG scales) posted at once to a
farm with one warm worker; rounds alternate batching off (``RENDERFARM_BATCHING=0``: one job per claim)
and on, in one run, so both see the same machine. Prints images/s (all 24 jobs, first POST to last
success) and p50/p95 latency (POST to success seen by a poller), and the ratios.

Engine alone: seconds per image when ``b`` one-image jobs are denoised in one batch, b = 1, 2, 4, 8.

    .venv/bin/python -m bench.batching                                   # CPU, demo model, 64x64, 20 steps
    .venv/bin/python -m bench.batching --checkpoint sd15.safetensors --size 512   # GPU

``BENCH_KEEP=1`` keeps the run's folder (server and worker logs) under /tmp.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.bench_farm import KEY, models_folder, start_servers
from bench.overhead import machine
from tests.farm_harness import start_api, start_worker

PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "a castle on a hill, oil painting", "a bowl of fruit",
           "a portrait of a knight", "a city street at night, rain")


def job_body(args: argparse.Namespace, i: int) -> dict[str, Any]:
    return {"prompt": PROMPTS[i % len(PROMPTS)] + f", variant {i}", "negative_prompt": "blurry", "steps": args.steps,
            "width": args.size, "height": args.size, "sampler_name": args.sampler, "cfg_scale": 5.0 + (i % 5),
            "seed": 1000 + i}


def engine_alone(checkpoint: Path, args: argparse.Namespace) -> dict[int, float]:
    """Seconds per image with b images in one batch (median of ``args.repeats`` runs)."""
    import torch

    from shared.jobs.contract import RenderSpec
    from shared.jobs.schemas import Txt2ImgRequest, resolve_params
    from worker.engine.batch import BatchJob, BatchLimits
    from worker.engine.checkpoint_loader import load_pipeline
    from worker.engine.engine import GenerationEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as the worker's "auto" (worker/runtime.py)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = load_pipeline(checkpoint, device=device, dtype=dtype)
    engine, config = GenerationEngine(checkpoint.parent.parent), dict(pipe.scheduler.config)
    out = {}
    for batch in (1, 2, 4, 8):
        times = []
        for repeat in range(args.repeats + 1):
            jobs = [BatchJob(uuid.uuid4(), RenderSpec.from_stored(resolve_params(Txt2ImgRequest(**job_body(args, i)),
                                                                                 "bench")))
                    for i in range(batch)]
            start = time.perf_counter()
            engine.render_batch(pipe, jobs, config, limits=BatchLimits(max_images=batch, max_pixels=10**9))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:  # the first run warms up
                times.append((time.perf_counter() - start) / batch)
        out[batch] = statistics.median(times)
    return out


def farm_round(base: str, args: argparse.Namespace) -> tuple[float, list[float], list[int]]:
    """24 jobs posted at once; (images/s, latencies, effective batch sizes)."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        def one(i: int) -> tuple[float, int]:
            start = time.perf_counter()
            resp = client.post("/v1/jobs", json=job_body(args, i))
            assert resp.status_code == 202, f"{resp.status_code} {resp.text[:300]}"
            job_id = resp.json()["id"]
            while True:
                polled = client.get(f"/v1/jobs/{job_id}")
                assert polled.status_code == 200, f"{polled.status_code} {polled.text[:300]}"
                job = polled.json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(args.poll)
            assert job["status"] == "succeeded", job
            return time.perf_counter() - start, int(job.get("batch_images") or 1)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(one, range(args.jobs)))
        elapsed = time.perf_counter() - start
    return args.jobs / elapsed, [r[0] for r in results], [r[1] for r in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each (off, on), interleaved")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--max-batch-images", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, help="a .safetensors checkpoint (default: the demo model)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RENDERFARM_TORCH_THREADS", "0")))
    parser.add_argument("--repeats", type=int, default=3, help="engine-alone runs per batch size")
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--skip-farm", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    models, checkpoint = models_folder(work, args.checkpoint)
    print(f"machine: {machine()}")
    print(f"model: {checkpoint.name}, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, "
          f"torch threads {args.threads or 'default'}")
    if not args.skip_engine:
        per_image = engine_alone(checkpoint, args)
        print("engine alone, s/img: " + ", ".join(f"batch {b}: {s:.4f}" for b, s in per_image.items())
              + f"; batch 8 vs 1: {per_image[1] / per_image[8]:.2f}x images/s")
    if args.skip_farm:
        return
    servers = start_servers(work, models, args.threads)
    results: dict[str, list[tuple[float, list[float], list[int]]]] = {"off": [], "on": []}
    api = None
    try:
        api, base = start_api(servers.env, work)
        for round_index in range(args.rounds):
            for mode in ("off", "on"):
                env = dict(servers.env, RENDERFARM_BATCHING="1" if mode == "on" else "0",
                           RENDERFARM_MAX_BATCH_IMAGES=str(args.max_batch_images))
                worker = start_worker(env, work, name=f"{mode}{round_index}", timeout=600)
                try:
                    farm_round(base, argparse.Namespace(**{**vars(args), "jobs": 2}))  # warm up
                    results[mode].append(farm_round(base, args))
                finally:
                    worker.stop()
    finally:
        if api is not None:
            api.stop()
        servers.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)

    summary = {}
    print(f"farm: {args.jobs} concurrent one-image jobs, one warm worker, {args.rounds} rounds each, interleaved")
    print(f"{'':14}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}  batch sizes seen")
    for mode, rounds in results.items():
        rate = statistics.median(r[0] for r in rounds)
        latencies = [x for r in rounds for x in r[1]]
        sizes = sorted({s for r in rounds for s in r[2]})
        summary[mode] = (rate, percentile(latencies, 50), percentile(latencies, 95))
        print(f"batching {mode:5}{rate:10.2f}{summary[mode][1]:9.2f}{summary[mode][2]:9.2f}  {sizes}")
    on, off = summary["on"], summary["off"]
    print(f"ratio on/off: images/s {on[0] / off[0]:.2f}x, p50 latency {on[1] / off[1]:.2f}x, "
          f"p95 latency {on[2] / off[2]:.2f}x")


if __name__ == "__main__":
    main()
