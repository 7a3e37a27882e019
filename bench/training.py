"""Training speed per kind (issue 15): optimizer steps per second for an embedding, a hypernetwork and a LoRA.

Each kind trains ``--steps`` steps on a generated dataset (coloured shapes with captions) after ``--warmup``
steps, on the demo checkpoint at 64x64 on the CPU by default, or on ``--checkpoint`` (a full-size random SD1.5:
``devtools/scripts/make_random_sd15.py``) at ``--size`` on ``--device cuda`` in fp16. The engine alone: no
farm, no database; the numbers are the trainer's own (worker/engine/training).

    python -m bench.training                                     # demo model, CPU
    python -m bench.training --checkpoint sd15.safetensors --device cuda --size 512 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from shared.jobs.training_spec import TrainSpec
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.training import StepReport, TrainingSample, train

KIND_SETTINGS: dict[str, dict[str, Any]] = {
    "embedding": dict(learn_rate="0.005", nvpt=8, init_text="shape", template=("a photo of [name], [filewords]",)),
    "hypernetwork": dict(learn_rate="0.00001", layer_structure=(1.0, 2.0, 1.0), activation_func="relu",
                         template=("[filewords]",)),
    "lora": dict(learn_rate="0.0001", network_dim=16, network_alpha=8.0, template=("[filewords]",)),
}


def dataset(count: int, size: int) -> list[TrainingSample]:
    samples = []
    for i in range(count):
        image = Image.new("RGB", (size, size), "white")
        colour = ("red", "blue", "green", "orange")[i % 4]
        box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
        (ImageDraw.Draw(image).ellipse if i % 2 else ImageDraw.Draw(image).rectangle)(box, fill=colour)
        samples.append(TrainingSample(image, f"a {colour} {'circle' if i % 2 else 'square'}"))
    return samples


def sizes_of(pipe: Any) -> tuple[int, ...]:
    """The hypernetwork sizes this checkpoint's attention uses (the WebUI's for SD1.5; the demo model's own)."""
    from worker.engine.training.hypernetwork import attention_widths

    return tuple(sorted(attention_widths(pipe.unet)))


def bench_kind(pipe: Any, kind: str, args: argparse.Namespace, samples: list[TrainingSample]) -> dict[str, Any]:
    settings = dict(KIND_SETTINGS[kind])
    if kind == "hypernetwork":
        settings["enable_sizes"] = sizes_of(pipe)
    spec = TrainSpec(kind=kind, name=f"bench-{kind}", model="bench", dataset="bench", items=(), seed=1,
                     steps=args.warmup + args.steps, batch_size=args.batch_size, training_width=args.size,
                     training_height=args.size, **settings)
    marks: list[float] = []

    def on_step(report: StepReport) -> None:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(pipe, spec, samples, on_step=on_step)
    total = time.perf_counter() - started
    timed = marks[args.warmup:]
    seconds = (timed[-1] - marks[args.warmup - 1]) if args.warmup else (timed[-1] - started)
    steps_per_second = args.steps / seconds
    out = {"kind": kind, "steps": args.steps, "batch_size": args.batch_size, "size": args.size,
           "steps_per_s": round(steps_per_second, 3), "images_per_s": round(steps_per_second * args.batch_size, 2),
           "wall_s_with_probe_and_latents": round(total, 1), "file_mb": round(len(result.file_bytes) / 1e6, 2),
           "probe_before": round(result.probe_loss_before or 0, 5),
           "probe_after": round(result.probe_loss_after or 0, 5)}
    if pipe.device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a .safetensors SD1.x checkpoint (default: the demo model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--kinds", default="embedding,hypernetwork,lora")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RENDERFARM_TORCH_THREADS", "0")))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from devtools.demo_models.sd15 import build_demo_checkpoint

        checkpoint = build_demo_checkpoint(Path(tempfile.mkdtemp(prefix="bench-training-")) / "demo.safetensors")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = load_pipeline(checkpoint, device=args.device, dtype=dtype)
    samples = dataset(args.images, args.size)
    results = []
    for kind in args.kinds.split(","):
        try:
            results.append(bench_kind(pipe, kind, args, samples))
        except ValueError as exc:  # a kind this build does not train yet
            results.append({"kind": kind, "error": str(exc)})
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                         "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda")
                                         else None, "results": results}, indent=2))


if __name__ == "__main__":
    main()
