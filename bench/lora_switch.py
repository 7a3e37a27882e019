"""Switching LoRAs on a warm pipeline: cached adapters vs loading every LoRA from disk each switch.

Why: a farm serving many LoRAs is only fast if a switch is a ``set_adapters`` call and not a file
read plus adapter injection. This measures both on the demo model with ``--loras`` LoRAs (kohya
format, UNet and text encoder parts), cycling through them in a fixed order:

- cached: ``LoraCache.apply`` with every LoRA resident (after one warm-up pass), i.e. what a job
  pays when its LoRA is already on the pipeline;
- disk: what a worker without the cache pays per switch: read the file, ``load_lora_weights``,
  ``set_adapters``, and ``delete_adapters`` of the previous one.

Only the switch is timed, not rendering. Usage: ``python -m bench.lora_switch [--loras 8] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from devtools.demo_models.lora_sd15 import write_demo_lora
from devtools.demo_models.sd15 import build_demo_checkpoint
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.lora import LoraCache, LoraRequest


def machine() -> str:
    """One line naming the machine, so a table is never read without it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU"


def bench_cached(pipe: object, requests: list[LoraRequest], rounds: int) -> list[float]:
    """Milliseconds per switch with every LoRA resident on the pipeline."""
    cache = LoraCache(max_resident=len(requests))
    for request in requests:  # warm-up: load each once (disk + injection), not timed
        cache.apply(pipe, [request])
    times = []
    for _ in range(rounds):
        for request in requests:
            started = time.perf_counter()
            cache.apply(pipe, [request])
            times.append((time.perf_counter() - started) * 1000)
    assert cache.files.reads == len(requests), "a cached switch read a file"
    pipe.disable_lora()
    pipe.delete_adapters(list(cache._resident))
    return times


def bench_disk(pipe: object, requests: list[LoraRequest], rounds: int) -> list[float]:
    """Milliseconds per switch when each switch reads and injects the LoRA (previous one deleted)."""
    times, previous = [], None
    for r in range(rounds):
        for i, request in enumerate(requests):
            name = f"disk_{r}_{i}"
            started = time.perf_counter()
            pipe.load_lora_weights(load_file(str(request.path)), adapter_name=name)
            pipe.enable_lora()
            pipe.set_adapters([name], adapter_weights=[request.weight])
            if previous is not None:
                pipe.delete_adapters(previous)
            times.append((time.perf_counter() - started) * 1000)
            previous = name
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = load_pipeline(build_demo_checkpoint(root / "demo.safetensors"))
        pipe.set_progress_bar_config(disable=True)
        requests = [LoraRequest(f"demo-{i}", 1.0, write_demo_lora(root / "Lora" / f"demo-{i}.safetensors", 100 + i))
                    for i in range(args.loras)]
        size = requests[0].path.stat().st_size
        cached = bench_cached(pipe, requests, args.rounds)
        disk = bench_disk(pipe, requests, args.rounds)
    c, d = statistics.median(cached), statistics.median(disk)
    print(f"machine: {machine()}")
    print(f"demo model, {args.loras} LoRAs of {size / 1e3:.0f} kB (kohya, UNet+TE), {args.rounds} rounds, "
          f"{len(cached)} switches each")
    print(f"{'mode':<34}{'median ms':>10}{'p90 ms':>10}{'mean ms':>10}")
    for label, values in (("cached switch (LoraCache.apply)", cached), ("load from disk per switch", disk)):
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"{label:<34}{statistics.median(values):>10.2f}{p90:>10.2f}{statistics.mean(values):>10.2f}")
    print(f"ratio cached/disk (median): {c / d:.3f}  (target < 0.1: {'met' if c / d < 0.1 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
