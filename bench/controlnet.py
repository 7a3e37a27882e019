"""The cost of ControlNet: seconds per image with 0, 1 and 2 units, alone and in a batch of 4, in one run.

Engine alone (no farm around it), the same job with and without units, so the ratio is the unit's cost: one
more network (the UNet's encoder half) per model evaluation, plus the preprocessor once per job. Units use
``canny`` on a 512-pixel processor resolution (the extension's default) and the demo ControlNet.

    .venv/bin/python -m bench.controlnet                       # CPU, demo model and demo ControlNet, 64x64
    .venv/bin/python -m bench.controlnet --full --size 512     # GPU: random-weight full-size SD1.5 + ControlNet
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.overhead import machine


def control_png(size: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 4, size // 8, 3 * size // 4, 7 * size // 8), outline="white", width=max(1, size // 32))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_models(root: Path, full: bool) -> tuple[Path, list[dict[str, Any]]]:
    """A checkpoint and two ControlNets (demo-tiny, or random-weight full-size SD1.5 with ``full``)."""
    from devtools.demo_models.controlnet import build_demo_controlnet
    from devtools.demo_models.sd15 import build_demo_checkpoint
    from shared.controlnet.models import list_controlnets

    folder = root / "ControlNet"
    if full:
        from devtools.demo_models.sd15 import save_safetensors_atomically
        from devtools.scripts.make_random_sd15 import build_state_dict

        checkpoint = save_safetensors_atomically(build_state_dict(0), root / "Stable-diffusion" / "sd15.safetensors")
        for seed in (0, 1):
            build_demo_controlnet(folder / f"cn{seed}.safetensors", "sd15", seed)
    else:
        checkpoint = build_demo_checkpoint(root / "Stable-diffusion" / "demo.safetensors")
        for seed in (0, 1):
            build_demo_controlnet(folder / f"cn{seed}.safetensors", seed=seed)
    units = [{"module": "canny", "model": e.name, "model_title": e.title, "model_location": e.location,
              "image": "control.png"} for e in list_controlnets(root)]
    return checkpoint, units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="full-size random-weight SD1.5 (GPU)")
    args = parser.parse_args()

    import torch

    from shared.jobs.contract import RenderSpec
    from worker.engine.batch import BatchJob, BatchLimits
    from worker.engine.checkpoint_loader import load_pipeline
    from worker.engine.engine import GenerationEngine
    from worker.runtime import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        checkpoint, units = build_models(root, args.full)
        device, dtype = pick_device("auto")
        pipe = load_pipeline(checkpoint, device=device, dtype=dtype)
        engine, config = GenerationEngine(root), dict(pipe.scheduler.config)
        images = {"control.png": control_png(args.size)}
        base = {"model": "bench", "prompt": "a portrait of a knight", "negative_prompt": "blurry", "steps": args.steps,
                "cfg_scale": 7.0, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "width": args.size,
                "height": args.size}
        results: dict[tuple[int, int], float] = {}
        for batch in (1, 4):
            for count in (0, 1, 2):
                times = []
                for repeat in range(args.repeats + 1):
                    jobs = [BatchJob(uuid.uuid4(), RenderSpec.from_stored({**base, "seed": 100 + i,
                                                                          "controlnet": units[:count]}))
                            for i in range(batch)]
                    start = time.perf_counter()
                    engine.render_batch(pipe, jobs, config, images.__getitem__,
                                        limits=BatchLimits(max_images=batch, max_pixels=10**9))
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if repeat:  # the first run warms up (and loads the ControlNets)
                        times.append((time.perf_counter() - start) / batch)
                results[(batch, count)] = statistics.median(times)
    print(f"machine: {machine()}; {device} {dtype}; {args.size}x{args.size}, {args.steps} steps DPM++ 2M Karras, "
          f"{'full-size random SD1.5' if args.full else 'demo-tiny'}; median of {args.repeats}")
    print("| batch | units | s/image | vs no unit |")
    print("|---:|---:|---:|---:|")
    for (batch, count), seconds in results.items():
        print(f"| {batch} | {count} | {seconds:.4f} | {seconds / results[(batch, 0)]:.2f}x |")


if __name__ == "__main__":
    main()
