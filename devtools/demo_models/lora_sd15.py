"""Tiny random LoRA files for the demo checkpoint, in the kohya and the diffusers (peft) key layouts.

Why: no LoRA can be downloaded on these machines, yet the LoRA path (formats, cache, leakage) must be
tested and benchmarked on real files. Both layouts are written from the SAME random matrices so the
two files describe the same network: kohya stores ``lora_down``/``lora_up`` plus an ``alpha`` whose
``alpha / rank`` scale is applied at run time; the diffusers file has that scale folded into the up
matrix. The scale is a power of two (``alpha = rank / 2``), so folding it is exact in floating point
and both files must give the same pixels.

CLI: ``python -m devtools.demo_models.lora_sd15 models_dir [count]`` writes ``Lora/demo-lora-<i>.safetensors``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from devtools.demo_models.sd15 import build_demo_models, save_safetensors_atomically

# Attention projections: what most published SD1.5 LoRAs train.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
RANK = 4
ALPHA = RANK / 2  # alpha / rank = 0.5: a power of two, so folding it into the up matrix is exact
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

Matrices = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]


def linear_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers of ``model`` whose path ends in one of ``suffixes``, in module order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name.endswith("." + s) for s in suffixes)]


def demo_lora_matrices(seed: int, scale: float = 0.05, text_encoder: bool = True) -> Matrices:
    """``{(part, module path): (down, up)}`` for the demo model, fp16-representable, from ``seed``.

    ``part`` is ``"unet"`` or ``"text_encoder"``; ``scale`` keeps the change small like a real LoRA
    but large enough to move pixels after two steps.
    """
    unet, _, te = build_demo_models()
    gen = torch.Generator().manual_seed(seed)
    parts = [("unet", linear_targets(unet, UNET_TARGETS))]
    if text_encoder:
        # Published files name CLIP's layers from CLIPTextModel ("text_model.encoder..."), whatever
        # transformers' own module tree looks like today.
        named = linear_targets(te, TEXT_TARGETS)
        parts.append(("text_encoder", [(n if n.startswith("text_model.") else f"text_model.{n}", m) for n, m in named]))
    return random_factors(parts, gen, scale)


def random_factors(parts: list[tuple[str, list[tuple[str, torch.nn.Linear]]]], gen: torch.Generator,
                   scale: float) -> Matrices:
    """``{(part, module path): (down, up)}`` for each Linear of each part, drawn from ``gen`` in order."""
    out = {}
    for part, modules in parts:
        for name, linear in modules:
            down = (torch.randn(RANK, linear.in_features, generator=gen) * scale).half().float()
            up = torch.randn(linear.out_features, RANK, generator=gen) * scale * 4
            # Round so that BOTH up and up * alpha/rank are exact fp16 values (tiny ones would lose bits).
            up = (up * (ALPHA / RANK)).half().float() / (ALPHA / RANK)
            out[(part, name)] = (down, up)
    return out


def kohya_state_dict(matrices: Matrices, prefixes: dict[str, str] | None = None,
                     rename: Callable[[str, str], str] | None = None) -> dict[str, torch.Tensor]:
    """kohya-ss (WebUI) layout: ``lora_unet_<path>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``.

    ``prefixes`` maps each part to its kohya prefix (SD1.5's by default); ``rename(part, path)`` gives the
    module path kohya names (SDXL's UNet uses the SGM names), else the diffusers path is used.
    """
    prefixes = prefixes or KOHYA_PREFIXES
    out = {}
    for (part, name), (down, up) in matrices.items():
        key = prefixes[part] + (rename(part, name) if rename else name).replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.half().contiguous()
        out[f"{key}.lora_up.weight"] = up.half().contiguous()
        out[f"{key}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    return out


def diffusers_state_dict(matrices: Matrices) -> dict[str, torch.Tensor]:
    """diffusers / peft layout: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``, alpha folded into B."""
    out = {}
    for (part, name), (down, up) in matrices.items():
        out[f"{part}.{name}.lora_A.weight"] = down.half().contiguous()
        out[f"{part}.{name}.lora_B.weight"] = (up * (ALPHA / RANK)).half().contiguous()
    return out


def write_demo_lora(path: Path, seed: int, fmt: str = "kohya", text_encoder: bool = True) -> Path:
    """Write one demo LoRA (``fmt`` is ``"kohya"`` or ``"diffusers"``) to ``path``, atomically."""
    matrices = demo_lora_matrices(seed, text_encoder=text_encoder)
    tensors = kohya_state_dict(matrices) if fmt == "kohya" else diffusers_state_dict(matrices)
    return save_lora(path, tensors)


def save_lora(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a LoRA state dict to ``path`` as safetensors, atomically."""
    return save_safetensors_atomically(tensors, path, {"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m devtools.demo_models.lora_sd15 models_dir [count]")
        return 2
    torch.set_num_threads(1)
    for i in range(int(args[1]) if len(args) > 1 else 4):
        print(write_demo_lora(Path(args[0]) / "Lora" / f"demo-lora-{i}.safetensors", seed=100 + i))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
