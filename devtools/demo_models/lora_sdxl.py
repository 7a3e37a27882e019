"""Tiny random LoRA files for the tiny SDXL (:mod:`devtools.demo_models.sdxl`), in the kohya and diffusers layouts.

Why: SDXL LoRAs have their own key layout and must be tested on real files without downloading one.
kohya-ss trains SDXL on Stability's SGM UNet, so its files name UNet modules in the SGM numbering
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), the CLIP ViT-L encoder ``lora_te1_*``
and the OpenCLIP ViT-bigG encoder ``lora_te2_*`` (both named after transformers' CLIP modules). The
diffusers / peft layout uses ``unet.*``, ``text_encoder.*`` and ``text_encoder_2.*`` with diffusers' own
module paths. As in :mod:`devtools.demo_models.lora_sd15`, both files come from the SAME random low-rank factors with
``alpha / rank`` a power of two, so they describe the same network and must give the same pixels.

Targets are what kohya's SDXL LoRAs train: every Linear of the UNet's transformer blocks (projections
in and out, attention, feed-forward) and the text encoders' attention projections.

CLI: ``python -m devtools.demo_models.lora_sdxl models_dir [count]`` writes ``Lora/demo-xl-lora-<i>.safetensors``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from devtools.demo_models.lora_sd15 import (
    TEXT_TARGETS,
    Matrices,
    diffusers_state_dict,
    kohya_state_dict,
    linear_targets,
    random_factors,
    save_lora,
)
from devtools.demo_models.sdxl import DEMO_SDXL_ARCH, build_demo_sdxl_models
from worker.engine import ldm_layout
from worker.engine.checkpoint_loader import checkpoint_config_dir

UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
SDXL_PARTS = ("unet", "text_encoder", "text_encoder_2")


def demo_sdxl_lora_matrices(seed: int, parts: Iterable[str] = SDXL_PARTS, scale: float = 0.05) -> Matrices:
    """``{(part, diffusers module path): (down, up)}`` for the tiny SDXL's ``parts``, from ``seed``.

    ``parts`` picks among ``unet``, ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (OpenCLIP-G), so a test
    can show each part matters on its own.
    """
    wanted = set(parts)
    unknown = wanted - set(SDXL_PARTS)
    if unknown:
        raise ValueError(f"unknown SDXL LoRA parts: {sorted(unknown)}")
    models = build_demo_sdxl_models()
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for part in SDXL_PARTS:  # a fixed order, so a part's factors do not depend on which others are written
        module = getattr(models, part)
        named = linear_targets(module, UNET_TARGETS if part == "unet" else TEXT_TARGETS)
        if part != "unet":
            named = [(n if n.startswith("text_model.") else f"text_model.{n}", m) for n, m in named]
        chosen.append((part, named))
    factors = random_factors(chosen, gen, scale)
    return {key: value for key, value in factors.items() if key[0] in wanted}


def kohya_sdxl_state_dict(matrices: Matrices, unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """kohya's SDXL layout: SGM UNet names under ``lora_unet_``, ``lora_te1_`` and ``lora_te2_``.

    The SGM names come from the table that writes SGM checkpoints (:mod:`ldm_layout`), for ``unet_config``.
    """
    rules = ldm_layout.index_rules(ldm_layout.unet_rules(unet_config))

    def rename(part: str, name: str) -> str:
        if part != "unet":
            return name
        return ldm_layout.map_key(f"{name}.weight", rules)[0].removesuffix(".weight")

    return kohya_state_dict(matrices, SDXL_KOHYA_PREFIXES, rename)


def write_demo_sdxl_lora(path: Path, seed: int, fmt: str = "kohya", parts: Iterable[str] = SDXL_PARTS) -> Path:
    """Write one tiny-SDXL LoRA (``fmt`` ``"kohya"`` or ``"diffusers"``) covering ``parts`` to ``path``."""
    if fmt not in ("kohya", "diffusers"):
        raise ValueError(f"unknown LoRA format {fmt!r}")
    matrices = demo_sdxl_lora_matrices(seed, parts)
    if fmt == "diffusers":
        return save_lora(path, diffusers_state_dict(matrices))
    from diffusers import UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(checkpoint_config_dir(DEMO_SDXL_ARCH) / "unet")
    return save_lora(path, kohya_sdxl_state_dict(matrices, unet_config))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m devtools.demo_models.lora_sdxl models_dir [count]")
        return 2
    torch.set_num_threads(1)
    for i in range(int(args[1]) if len(args) > 1 else 4):
        print(write_demo_sdxl_lora(Path(args[0]) / "Lora" / f"demo-xl-lora-{i}.safetensors", seed=200 + i))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
