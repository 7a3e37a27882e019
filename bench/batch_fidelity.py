"""How far an image rendered inside a batch is from the same image rendered alone.

For every sampler (and img2img, inpainting, hires fix, SDXL and a LoRA on a few), three jobs with one
batch key but different prompts (one of two 75-token chunks), negative prompts, seeds, CFG scales and
batch sizes are rendered together in one ``render_batch`` call, then every image again alone
(``BatchLimits(invariant=True)``: one image per UNet call). Prints the distribution of the max absolute
pixel difference and the PSNR; the README states the bound and ``tests/unit/test_batch_fidelity.py``
enforces it.

    .venv/bin/python -m bench.batch_fidelity            # demo models, 64x64, CPU
"""

from __future__ import annotations

import argparse
import math
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LONG_PROMPT = "a lighthouse on a cliff, " + ", ".join(f"detail {i}" for i in range(40))
JOBS = (  # (prompt, negative prompt, seed, cfg scale, batch size)
    ("a red lighthouse, (stormy sea:1.2)", "blurry", 1234, 7.0, 2),
    (LONG_PROMPT, "", 77, 4.5, 1),
    ("[a cat:a dog:2] AND a hat :0.6", "ugly, (lowres:1.3)", 9001, 11.0, 1),
)


@dataclass(frozen=True)
class Difference:
    case: str
    max_abs: int
    psnr: float  # dB; inf when identical


def compare(batched: np.ndarray, alone: np.ndarray) -> tuple[int, float]:
    """Max absolute difference of two uint8 images and their PSNR (inf when identical)."""
    a, b = batched.astype(np.int16), alone.astype(np.int16)
    mse = float(np.mean((a - b).astype(np.float64) ** 2))
    return int(np.abs(a - b).max()), math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def measure(engine: Any, pipe: Any, base: dict[str, Any], case: str,
            load_image: Callable[[str], bytes] | None = None) -> list[Difference]:
    """The three jobs batched vs alone, one Difference per image."""
    from shared.jobs.contract import RenderSpec
    from worker.engine.batch import BatchJob, BatchLimits

    config = dict(pipe.scheduler.config)
    jobs = [BatchJob(uuid.uuid4(), RenderSpec.from_stored({**base, "prompt": prompt, "negative_prompt": negative,
                                                          "seed": seed, "cfg_scale": cfg, "batch_size": size}))
            for prompt, negative, seed, cfg, size in JOBS]
    together = engine.render_batch(pipe, jobs, config, load_image, limits=BatchLimits(max_images=8))
    out = []
    for job in jobs:
        images = together[job.job_id]
        assert not isinstance(images, Exception), images
        for item in images:
            assert item.batch_images == 4, item.batch_images
            spec = job.spec.model_copy(update={"seed": item.seed, "batch_size": 1})
            (alone,) = engine.render(pipe, spec, config, load_image, limits=BatchLimits(invariant=True))
            max_abs, psnr = compare(np.asarray(item.image.convert("RGB")), np.asarray(alone.image.convert("RGB")))
            out.append(Difference(case, max_abs, psnr))
    return out


BASE = {"mode": "txt2img", "steps": 6, "sampler_name": "Euler a", "scheduler": "Automatic", "subseed": 5,
        "width": 64, "height": 64, "model": "demo", "clip_skip": 1}


def all_cases(work: Path, samplers: list[str] | None = None) -> list[Difference]:
    """Every sampler on txt2img, then img2img, inpainting, hires fix, a LoRA and SDXL."""
    import io

    import torch
    from PIL import Image

    from devtools.demo_models.lora_sd15 import write_demo_lora
    from devtools.demo_models.sd15 import build_demo_checkpoint
    from devtools.demo_models.sdxl import build_demo_sdxl_checkpoint
    from shared.webui.samplers import SAMPLERS
    from worker.engine.checkpoint_loader import load_pipeline
    from worker.engine.engine import GenerationEngine

    torch.set_num_threads(1)
    (work / "Lora").mkdir(parents=True, exist_ok=True)
    write_demo_lora(work / "Lora" / "style.safetensors", seed=3)
    engine = GenerationEngine(work)
    pipe = load_pipeline(build_demo_checkpoint(work / "demo.safetensors"))
    rng = np.random.default_rng(0)
    blobs: dict[str, bytes] = {}
    for key, array in {"init.png": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                       "mask.png": np.pad(np.full((64, 32), 255, np.uint8), ((0, 0), (0, 32)))}.items():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        blobs[key] = buffer.getvalue()
    out: list[Difference] = []
    for name in samplers or [spec.name for spec in SAMPLERS]:
        out += measure(engine, pipe, {**BASE, "sampler_name": name}, f"txt2img {name}")
    for name in ("Euler a", "DPM++ 2M", "DPM++ SDE"):
        img2img = {**BASE, "sampler_name": name, "mode": "img2img", "init_images": ["init.png"],
                   "denoising_strength": 0.6}
        out += measure(engine, pipe, img2img, f"img2img {name}", blobs.__getitem__)
        out += measure(engine, pipe, {**img2img, "mask": "mask.png"}, f"inpaint {name}", blobs.__getitem__)
        out += measure(engine, pipe, {**BASE, "sampler_name": name, "enable_hr": True, "hr_scale": 1.5,
                                      "hr_second_pass_steps": 3}, f"hires {name}")
        lora = [{"name": "style", "weight": 0.8, "file": "style.safetensors", "hash": "0123456789ab"}]
        out += measure(engine, pipe, {**BASE, "sampler_name": name, "loras": lora}, f"lora {name}")
    xl = load_pipeline(build_demo_sdxl_checkpoint(work / "xl.safetensors"))
    for name in ("Euler a", "DPM++ 2M"):
        out += measure(engine, xl, {**BASE, "sampler_name": name}, f"sdxl {name}")
    return out


def summary(rows: list[Difference]) -> str:
    worst = max(rows, key=lambda r: r.max_abs)
    finite = [r.psnr for r in rows if math.isfinite(r.psnr)]
    identical = sum(1 for r in rows if r.max_abs == 0)
    lines = [f"{len(rows)} images in {len({r.case for r in rows})} cases; {identical} identical to their solo render",
             f"max abs pixel difference: median {np.median([r.max_abs for r in rows]):.0f}, "
             f"p95 {np.percentile([r.max_abs for r in rows], 95):.0f}, max {worst.max_abs} ({worst.case})",
             f"PSNR (dB, of images that differ): min {min(finite, default=math.inf):.1f}, "
             f"median {np.median(finite) if finite else math.inf:.1f}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", action="append", help="only these samplers (txt2img); default: all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = all_cases(Path(work), args.sampler)
    for row in rows:
        print(f"{row.case:28s} max_abs={row.max_abs:3d} psnr={row.psnr:.1f}")
    print(summary(rows))


if __name__ == "__main__":
    main()
