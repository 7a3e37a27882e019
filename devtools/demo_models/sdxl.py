"""A tiny SDXL-architecture checkpoint, built locally from random weights, in the real SGM file layout.

Why: SDXL loading and rendering must be tested without downloading a 7 GB file. This builds the
same component types as SDXL base 1.0 (a ``text_time`` UNet with linear-projection transformers, a
CLIP ViT-L and an OpenCLIP-style ``CLIPTextModelWithProjection`` text encoder, a VAE that
downsamples x8 with SDXL's scaling factor) at a few MB, and writes it as ONE ``.safetensors`` file
with the key names real SDXL files use (``model.diffusion_model.*``,
``conditioner.embedders.0.transformer.text_model.*``, ``conditioner.embedders.1.model.*``,
``first_stage_model.*``), so it loads through ``from_single_file`` like a downloaded SDXL model.

Like :mod:`devtools.demo_models.sd15`, weights are fp16-representable so the fp16 file reloads bit for bit,
and the same seed gives the same bytes. The configs live in ``worker/assets/configs/demo-tiny-sdxl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from devtools.demo_models.sd15 import save_safetensors_atomically
from shared.models.architecture import METADATA_ARCH_KEY
from worker.engine import ldm_layout
from worker.engine.checkpoint_loader import checkpoint_config_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

DEMO_SDXL_ARCH = "demo-tiny-sdxl"
STORAGE_DTYPE = torch.float16


@dataclass
class SdxlModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


def build_demo_sdxl_models(seed: int = 0) -> SdxlModels:
    """The tiny SDXL's four models with seeded random weights (fp16-representable, held in fp32).

    The global torch RNG state is left as it was.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config_dir = checkpoint_config_dir(DEMO_SDXL_ARCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = SdxlModels(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
            text_encoder=CLIPTextModel(
                CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
            ),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2", local_files_only=True)
            ),
        )
    for model in (models.unet, models.vae, models.text_encoder, models.text_encoder_2):
        model.eval()
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(STORAGE_DTYPE).float())
    return models


def demo_sdxl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny SDXL's tensors keyed in the original SGM single-file layout, in fp16."""
    m = build_demo_sdxl_models(seed)
    mapped = ldm_layout.sdxl_diffusers_to_ldm(
        m.unet.state_dict(), m.unet.config, m.vae.state_dict(), m.vae.config,
        m.text_encoder.state_dict(), m.text_encoder_2.state_dict(),
    )
    return {key: tensor.detach().to(STORAGE_DTYPE).contiguous() for key, tensor in mapped.items()}


def build_demo_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the tiny SDXL checkpoint to ``path`` atomically, tagged with its architecture."""
    return save_safetensors_atomically(demo_sdxl_state_dict(seed), path, {METADATA_ARCH_KEY: DEMO_SDXL_ARCH})
