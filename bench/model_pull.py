"""Time to first image when a worker must pull its models from the store vs when it has them (issue 19).

One farm (own PostgreSQL and Redis, the local object store, one API whose models folder is empty): the demo
checkpoint and a demo LoRA are uploaded through ``POST /v1/models``. Then, twice, a render worker starts on the
same models folder, empty the first time, and one job naming the LoRA is submitted as soon as it reports ready:

- ``pulled``: the folder is empty; warming up pulls the checkpoint, the job pulls the LoRA;
- ``cached``: the folder holds both from the first run (the worker restarted; nothing is downloaded).

Reported per run: seconds from starting the worker process to ready, to the first image, the files it
downloaded, and a second job on the now warm worker. ``--pull-mbps`` caps the pull bandwidth
(RENDERFARM_MODEL_PULL_BYTES_PER_SECOND) to stand in for a network link; 0 is the local store at disk speed.
One run each, same machine: compare the ratio.

    .venv/bin/python -m bench.model_pull                 # local store, uncapped
    .venv/bin/python -m bench.model_pull --pull-mbps 10  # as if over a 10 MB/s link
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.bench_farm import KEY, start_servers
from bench.overhead import machine
from tests.farm_harness import ROOT, start_api, start_worker, wait_until

CKPT = "Stable-diffusion/demo-tiny.safetensors"
LORA = "Lora/demo-lora-0.safetensors"


def _upload(client: httpx.Client, path: Path, kind: str, name: str) -> None:
    with open(path, "rb") as file:
        resp = client.post("/v1/models", data={"kind": kind, "name": name}, files={"file": (path.name, file)})
    assert resp.status_code == 201, resp.text


def _render(client: httpx.Client, seed: int, args: argparse.Namespace) -> float:
    body = {"prompt": "a lighthouse at dusk <lora:ink:0.8>", "width": args.size, "height": args.size,
            "steps": args.steps, "sampler_name": "Euler", "seed": seed}
    began = time.perf_counter()
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]

    def done() -> dict | None:
        view = client.get(f"/v1/jobs/{job_id}").json()
        return view if view["status"] in ("succeeded", "failed", "canceled") else None

    view = wait_until(done, 600, interval=0.05, message="the job to finish")
    assert view["status"] == "succeeded", view
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pull-mbps", type=float, default=0.0, help="pull bandwidth cap in MB/s (0: none)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-model-pull-"))
    procs = []
    rows = []
    try:
        source, api_folder, worker_folder = work / "source", work / "api-models", work / "worker-models"
        for module, extra in (("devtools.demo_models.sd15", []), ("devtools.demo_models.lora_sd15", ["1"])):
            subprocess.run([sys.executable, "-m", module, str(source), *extra], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        api_folder.mkdir()
        worker_folder.mkdir()
        servers = start_servers(work, api_folder, args.threads)
        env = dict(servers.env, RENDERFARM_MODEL_PULL_BYTES_PER_SECOND=str(int(args.pull_mbps * 1e6)))
        api, base = start_api(env, work)
        procs.append(api)
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        _upload(client, source / CKPT, "checkpoint", "demo-tiny.safetensors")
        _upload(client, source / LORA, "lora", "ink.safetensors")
        size = (source / CKPT).stat().st_size + (source / LORA).stat().st_size
        for label in ("pulled", "cached"):
            began = time.perf_counter()
            worker = start_worker(dict(env, RENDERFARM_MODELS_DIR=str(worker_folder)), work, name=label,
                                  timeout=600)
            ready = time.perf_counter() - began
            first = _render(client, 1, args)
            second = _render(client, 2, args)
            downloads = worker.log().count("pulled ")
            worker.stop()
            rows.append((label, ready, ready + first, downloads, second))
        client.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
        if "servers" in locals():
            servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    cap = f"pulls capped at {args.pull_mbps:g} MB/s" if args.pull_mbps else "pulls uncapped"
    print(f"machine: {machine()}; local object store, {cap}; demo checkpoint + LoRA = {size / 1e6:.1f} MB; "
          f"{args.size}x{args.size}, {args.steps} steps")
    print("| worker's folder | start to ready (s) | start to first image (s) | files pulled | next job (s) |")
    print("|---|---:|---:|---:|---:|")
    for label, ready, first, downloads, second in rows:
        print(f"| {label} | {ready:.2f} | {first:.2f} | {downloads} | {second:.2f} |")
    print(f"time to first image, pulled / cached: {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
