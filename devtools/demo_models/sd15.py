"""A tiny SD1.5-shaped demo checkpoint, built locally from random weights.

Why: no model weights can be downloaded on these machines, yet the farm must run end to end
(``make up``, tests, CI) through the same code real checkpoints take. This module builds a
scaled-down Stable Diffusion 1.5 (same block types, same CLIP tokenizer and vocabulary, a VAE
that downsamples x8 like the real one) from a fixed seed and writes it as ONE ``.safetensors``
file in the original single-file (LDM / WebUI) key layout, so the worker loads it with
``from_single_file`` exactly as it would load a file downloaded for the WebUI. It renders noise,
not pictures, but at 64x64 a render takes well under a second on a CPU.

Weights are stored in fp16 like most published checkpoints; the in-memory models are rounded to
fp16 first, so a float32 load of the file reproduces them bit for bit. Same seed, same bytes.

CLI: ``python -m devtools.demo_models.sd15 [models_dir]`` creates ``Stable-diffusion/demo-tiny.safetensors``
when the folder holds no checkpoint yet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from shared.models.architecture import METADATA_ARCH_KEY
from worker.engine import ldm_layout
from worker.engine.checkpoint_loader import checkpoint_config_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

DEMO_ARCH = "demo-tiny"
DEMO_FILENAME = "demo-tiny.safetensors"
# The folders the WebUI uses under its models directory; the farm keeps the same layout.
WEBUI_MODEL_FOLDERS = ("Stable-diffusion", "Lora", "VAE", "embeddings")
STORAGE_DTYPE = torch.float16


def build_demo_models(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The demo UNet, VAE and text encoder with seeded random weights (fp16-representable, fp32).

    The global torch RNG state is left as it was.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = checkpoint_config_dir(DEMO_ARCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
        text_encoder = CLIPTextModel(text_config)
    for model in (unet, vae, text_encoder):
        model.eval()
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(STORAGE_DTYPE).float())
    return unet, vae, text_encoder


def demo_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The demo checkpoint's tensors, keyed in the original single-file layout, in fp16."""
    unet, vae, text_encoder = build_demo_models(seed)
    mapped = ldm_layout.diffusers_to_ldm(
        unet.state_dict(), unet.config, vae.state_dict(), vae.config, text_encoder.state_dict()
    )
    return {key: tensor.detach().to(STORAGE_DTYPE).contiguous() for key, tensor in mapped.items()}


def save_safetensors_atomically(tensors: dict[str, torch.Tensor], path: Path,
                                metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` so that a crash leaves no half-written file, readable by other users."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates 0600; other worker users must read it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def build_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint to ``path`` (atomically: a crash leaves no half-written file)."""
    return save_safetensors_atomically(demo_state_dict(seed), path, {METADATA_ARCH_KEY: DEMO_ARCH})


def ensure_demo_checkpoint(models_dir: Path) -> Path | None:
    """Create the WebUI model folders; if no checkpoint exists yet, write the demo one.

    Returns the new file's path, or ``None`` when ``Stable-diffusion/`` already holds a
    ``.safetensors`` checkpoint (the operator's own models are never shadowed).
    """
    models_dir = Path(models_dir)
    for folder in WEBUI_MODEL_FOLDERS:
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    checkpoints = models_dir / "Stable-diffusion"
    if any(p.is_file() for p in checkpoints.glob("*.safetensors")):
        return None
    return build_demo_checkpoint(checkpoints / DEMO_FILENAME)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m devtools.demo_models.sd15 [models_dir]  (default: $RENDERFARM_MODELS_DIR or ./models)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    models_dir = Path(args[0] if args else os.environ.get("RENDERFARM_MODELS_DIR", "models"))
    torch.set_num_threads(1)  # tiny models; extra threads only spin on a busy CPU
    created = ensure_demo_checkpoint(models_dir)
    if created is None:
        print(f"{models_dir / 'Stable-diffusion'} already holds a checkpoint; nothing to do")
    else:
        print(f"wrote {created} ({created.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
