"""Write a FULL-SIZE Stable Diffusion 1.5 checkpoint with random weights, then load it back.

Why: no real weights can be downloaded here, but performance work and the loader need a file
with the real architecture and cost profile (860M-parameter UNet, ~2 GB in fp16). This builds
the SD1.5 UNet, VAE and CLIP ViT-L/14 text encoder from the bundled configs with seeded random
weights, writes them as ONE fp16 ``.safetensors`` file in the original single-file (WebUI) key
layout without any metadata tag (so detection must go by shapes, as for a downloaded file), and
then checks that ``load_pipeline`` recognises it as "sd15" and loads every weight bit for bit.

    python devtools/scripts/make_random_sd15.py OUT.safetensors [--device cuda --render 512 --steps 20]

Memory: about 6 GB of RAM at peak. On CPU a 512x512 step takes seconds; keep it out of CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.models.architecture import detect_architecture  # noqa: E402
from worker.engine import ldm_layout  # noqa: E402
from worker.engine.checkpoint_loader import checkpoint_config_dir, load_pipeline  # noqa: E402

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def build_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random SD1.5 weights in the original layout, fp16; one model in fp32 at a time."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = checkpoint_config_dir("sd15")
    out: dict[str, torch.Tensor] = {}
    torch.manual_seed(seed)

    def to_fp16(mapped: dict[str, torch.Tensor]) -> None:
        for key, tensor in mapped.items():
            out[key] = tensor.detach().to(torch.float16).contiguous()

    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    unet = UNet2DConditionModel.from_config(unet_config)
    to_fp16(ldm_layout.unet_to_ldm(unet.state_dict(), unet_config))
    del unet
    gc.collect()
    vae_config = AutoencoderKL.load_config(config_dir / "vae")
    vae = AutoencoderKL.from_config(vae_config)
    to_fp16(ldm_layout.vae_to_ldm(vae.state_dict(), vae_config))
    del vae
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True))
    to_fp16(ldm_layout.text_encoder_to_ldm(text.state_dict()))
    del text
    gc.collect()
    return out


def compare_with_file(pipe: StableDiffusionPipeline, path: Path) -> int:
    """Assert every loaded weight equals the file's tensor under our key mapping; return count."""
    parts = [
        (pipe.unet.state_dict(), ldm_layout.unet_rules(pipe.unet.config), ldm_layout.UNET_PREFIX),
        (pipe.vae.state_dict(), ldm_layout.vae_rules(pipe.vae.config), ldm_layout.VAE_PREFIX),
    ]
    checked = 0
    with safe_open(str(path), "pt") as f:
        for state, rules, prefix in parts:
            index = ldm_layout.index_rules(rules)
            for key, tensor in state.items():
                ldm_key, _ = ldm_layout.map_key(key, index)
                stored = f.get_tensor(prefix + ldm_key).reshape(tensor.shape)
                if not torch.equal(stored.to(tensor.device, tensor.dtype), tensor):
                    raise SystemExit(f"weight differs after loading: {key} <- {prefix + ldm_key}")
                checked += 1
        for key, tensor in ldm_layout.text_encoder_to_ldm(pipe.text_encoder.state_dict()).items():
            if not torch.equal(f.get_tensor(key).to(tensor.device, tensor.dtype), tensor):
                raise SystemExit(f"text encoder weight differs after loading: {key}")
            checked += 1
    return checked


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--render", type=int, default=0, help="also render one image of this size")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"out": str(args.out)}

    t0 = time.perf_counter()
    tensors = build_state_dict(args.seed)
    report["tensors"] = len(tensors)
    report["parameters"] = sum(t.numel() for t in tensors.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out))
    del tensors
    gc.collect()
    report["build_and_write_s"] = round(time.perf_counter() - t0, 1)
    report["bytes"] = args.out.stat().st_size

    report["detected"] = detect_architecture(args.out)
    if report["detected"] != "sd15":
        raise SystemExit(f"detected {report['detected']!r}, expected 'sd15'")

    t0 = time.perf_counter()
    pipe = load_pipeline(args.out, device=args.device, dtype=getattr(torch, args.dtype))
    report["load_s"] = round(time.perf_counter() - t0, 1)
    report["weights_checked"] = compare_with_file(pipe, args.out)

    if args.render:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        kwargs = dict(num_inference_steps=args.steps, height=args.render, width=args.render)
        pipe("warm-up", num_inference_steps=1, height=args.render, width=args.render)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        image = pipe("a photo of a cat", generator=generator, **kwargs).images[0]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        report["render"] = {"size": list(image.size), "steps": args.steps, "seconds": round(elapsed, 3)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
