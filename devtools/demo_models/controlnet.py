"""Tiny ControlNets for the demo checkpoints, in both file layouts the extension's users have.

A ControlNet is a trainable copy of its UNet's encoder plus a hint encoder and zero convolutions. Like a
real one it starts as a copy of the checkpoint's UNet (``ControlNetModel.from_unet``); the zero convolutions
(and the hint encoder's last conv), which training moves away from zero, get seeded random weights so the
control image visibly steers the render. Written as ONE ``.safetensors`` file either in the extension's
``control_model.*`` layout (what ``control_v11p_sd15_canny.safetensors`` holds) or in diffusers' names (the
smaller converted files), with our ``renderfarm_arch`` metadata tag, in fp16, held fp16-representable.

CLI: ``python -m devtools.demo_models.controlnet [models_dir]`` writes ``ControlNet/demo-tiny-control.safetensors``
(SD1.5 demo, extension layout) when the folder holds no ControlNet yet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import torch

from devtools.demo_models.sd15 import (
    DEMO_ARCH,
    DEMO_FILENAME,
    STORAGE_DTYPE,
    build_demo_models,
    save_safetensors_atomically,
)
from devtools.demo_models.sdxl import DEMO_SDXL_ARCH, build_demo_sdxl_models
from shared.controlnet.models import CONTROLNET_DIR
from shared.models.architecture import METADATA_ARCH_KEY
from worker.engine import ldm_layout

DEMO_CONTROLNET = "demo-tiny-control.safetensors"
Layout = Literal["ldm", "diffusers"]
# Scale of the zero convolutions' random weights: large enough that a control image changes a 64x64 render.
ZERO_CONV_STD = 0.2


def build_demo_controlnet_state(arch: str = DEMO_ARCH, seed: int = 0,
                                layout: Layout = "ldm") -> dict[str, torch.Tensor]:
    """The ControlNet of the demo checkpoint ``arch`` (seeded by ``seed``), keyed in ``layout``, in fp16. For "sd15"
    and "sdxl" a full-size random-weight one (benchmarks on a GPU; no metadata tag, detected by its shapes)."""
    from diffusers import ControlNetModel

    from worker.engine.controlnet_loader import controlnet_config_dir

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch in (DEMO_ARCH, DEMO_SDXL_ARCH):
            unet = build_demo_models(0)[0] if arch == DEMO_ARCH else build_demo_sdxl_models(0).unet
            controlnet = ControlNetModel.from_unet(unet)
        else:
            controlnet = ControlNetModel.from_config(ControlNetModel.load_config(controlnet_config_dir(arch)))
        with torch.no_grad():
            zero_modules = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                            controlnet.controlnet_cond_embedding.conv_out]
            for module in zero_modules:
                torch.nn.init.normal_(module.weight, std=ZERO_CONV_STD)
                torch.nn.init.normal_(module.bias, std=ZERO_CONV_STD / 4)
    state = {key: tensor.detach().to(STORAGE_DTYPE).contiguous() for key, tensor in controlnet.state_dict().items()}
    if layout == "ldm":
        state = ldm_layout.controlnet_to_ldm(state, controlnet.config)
    return state


def build_demo_controlnet(path: Path, arch: str = DEMO_ARCH, seed: int = 0, layout: Layout = "ldm") -> Path:
    """Write a demo ControlNet file to ``path`` atomically (full-size "sd15"/"sdxl" ones untagged)."""
    if arch not in (DEMO_ARCH, DEMO_SDXL_ARCH, "sd15", "sdxl"):
        raise ValueError(f"ControlNets are built for {DEMO_ARCH}, {DEMO_SDXL_ARCH}, sd15 and sdxl, not {arch!r}")
    metadata = {METADATA_ARCH_KEY: arch} if arch in (DEMO_ARCH, DEMO_SDXL_ARCH) else None
    return save_safetensors_atomically(build_demo_controlnet_state(arch, seed, layout), path, metadata)


def ensure_demo_controlnet(models_dir: Path) -> Path | None:
    """Write the SD1.5 demo ControlNet beside the demo checkpoint, unless ``ControlNet/`` already holds a
    ``.safetensors`` file (or there is no demo checkpoint for it to steer)."""
    folder = Path(models_dir) / CONTROLNET_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if any(p.is_file() for p in folder.glob("*.safetensors")):
        return None
    if not (Path(models_dir) / "Stable-diffusion" / DEMO_FILENAME).is_file():
        return None
    return build_demo_controlnet(folder / DEMO_CONTROLNET)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m devtools.demo_models.controlnet [models_dir]  (default: $RENDERFARM_MODELS_DIR or "
              "./models)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    models_dir = Path(args[0] if args else os.environ.get("RENDERFARM_MODELS_DIR", "models"))
    torch.set_num_threads(1)
    created = ensure_demo_controlnet(models_dir)
    if created is None:
        print(f"{models_dir / CONTROLNET_DIR} holds a ControlNet already (or no demo checkpoint exists); nothing to do")
    else:
        print(f"wrote {created} ({created.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
