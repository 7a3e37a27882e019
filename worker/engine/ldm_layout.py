"""Diffusers -> original single-file (LDM / SGM / WebUI) key layout for Stable Diffusion 1.x and SDXL.

Why this exists: the farm loads the same ``.safetensors`` files people download for the
WebUI. Those files use the original CompVis/LDM key names (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``). We cannot download one
here, so the project builds its own test checkpoints from diffusers models with random weights
and must write them in that layout. This module is the mirror image of diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint``:
if a file written with it loads through diffusers' own ``from_single_file`` bit for bit, the
loading path real checkpoints take is exercised.

The mapping is table-driven: for every diffusers *module* (a ResNet, an attention block, a
sampler conv) we compute the LDM module it corresponds to (:class:`ModuleRule`), plus a small
table of renames inside that module. A key that no rule covers raises, so a config change that
the tables do not understand fails loudly instead of writing a half-empty checkpoint.

SDXL files (Stability's SGM layout) keep the same UNet and VAE names, add the UNet's ``label_emb``
(diffusers' ``add_embedding``: pooled text + size embeddings), and store two text encoders:
CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.*`` and OpenCLIP ViT-bigG under
``conditioner.embedders.1.model.*`` in open_clip's own names (fused ``in_proj`` q/k/v, ``ln_1``,
``c_fc``, and ``text_projection`` stored as ``[width, projection_dim]``, the transpose of a Linear).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# The ControlNet extension's files (lllyasviel's ``cldm`` layout): the UNet's encoder half under this prefix.
CONTROLNET_PREFIX = "control_model."

# Inside a UNet ResBlock: diffusers sub-module -> LDM sub-module.
UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Top-level UNet modules outside the down/mid/up blocks.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# SDXL's "text_time" addition embedding (pooled text embedding + size/crop embeddings).
UNET_TEXT_TIME = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# Inside one transformer layer: transformers CLIP name -> open_clip name (q/k/v are fused separately).
OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# Inside a VAE ResnetBlock: only the shortcut is named differently.
VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
# Inside the VAE mid-block attention (LDM stores q/k/v/proj_out as 1x1 convolutions).
VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# Top-level VAE modules (everything else keeps its name: conv_in, conv_out, quant_conv, ...).
VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


@dataclass(frozen=True)
class ModuleRule:
    """One diffusers module and where it lives in the LDM layout."""

    diffusers: str
    ldm: str
    parts: Mapping[str, str] = field(default_factory=dict)
    linear_to_conv: bool = False  # LDM keeps these weights as 1x1 convs ([out, in, 1, 1])


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def unet_rules(config: Mapping[str, Any]) -> list[ModuleRule]:
    """Module map for a ``UNet2DConditionModel`` config (SD1.x, or SDXL with its ``text_time`` embedding).

    LDM numbers the UNet as flat ``input_blocks`` / ``output_blocks`` lists: per resolution level,
    ``layers_per_block`` entries of ``[ResBlock, (SpatialTransformer)]`` and then one sampler
    entry; the decoder has one more layer per level and puts the upsampler inside the last one.
    """
    addition = config.get("addition_embed_type")
    if config.get("class_embed_type") or addition not in (None, "text_time"):
        raise ValueError(f"class/addition embeddings ({addition!r}) are not covered by this table")
    rules = [ModuleRule(d, ldm) for d, ldm in UNET_TOP_LEVEL.items()]
    if addition == "text_time":
        rules += [ModuleRule(d, ldm) for d, ldm in UNET_TEXT_TIME.items()]
    layers = int(config["layers_per_block"])
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])

    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down_types):
        for layer in range(layers):
            rules.append(
                ModuleRule(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", UNET_RESNET_PARTS)
            )
            if _has_attention(block_type):
                rules.append(ModuleRule(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1"))
            index += 1
        if level != len(down_types) - 1:
            rules.append(ModuleRule(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1

    rules += [
        ModuleRule("mid_block.resnets.0", "middle_block.0", UNET_RESNET_PARTS),
        ModuleRule("mid_block.attentions.0", "middle_block.1"),
        ModuleRule("mid_block.resnets.1", "middle_block.2", UNET_RESNET_PARTS),
    ]

    index = 0
    for level, block_type in enumerate(up_types):
        attention = _has_attention(block_type)
        for layer in range(layers + 1):
            rules.append(
                ModuleRule(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", UNET_RESNET_PARTS)
            )
            if attention:
                rules.append(ModuleRule(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1"))
            if layer == layers and level != len(up_types) - 1:
                slot = 2 if attention else 1
                rules.append(ModuleRule(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv"))
            index += 1
    return rules


def controlnet_rules(config: Mapping[str, Any]) -> list[ModuleRule]:
    """Module map for a ``ControlNetModel`` config: the UNet's time embedding, input conv, down and middle
    blocks in the UNet's names, then ControlNet's own parts: the hint encoder (``input_hint_block``: convs at
    even indices 0, 2, ..., with SiLUs between), one zero conv per input block and one after the middle block.
    """
    unet_like = {**config, "up_block_types": []}
    rules = [rule for rule in unet_rules(unet_like) if not rule.diffusers.startswith(("conv_norm_out", "conv_out"))]
    embedding_convs = len(config["conditioning_embedding_out_channels"]) * 2 - 2
    rules.append(ModuleRule("controlnet_cond_embedding.conv_in", "input_hint_block.0"))
    rules += [ModuleRule(f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * i + 2}")
              for i in range(embedding_convs)]
    rules.append(ModuleRule("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * embedding_convs + 2}"))
    input_blocks = 1 + len(config["down_block_types"]) * int(config["layers_per_block"]) + \
        len(config["down_block_types"]) - 1
    rules += [ModuleRule(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(input_blocks)]
    rules.append(ModuleRule("controlnet_mid_block", "middle_block_out.0"))
    return rules


def controlnet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers ControlNet state dict -> ``control_model.*`` keys (the extension's single-file layout)."""
    return _convert(state_dict, controlnet_rules(config), CONTROLNET_PREFIX)


def vae_rules(config: Mapping[str, Any]) -> list[ModuleRule]:
    """Module map for an ``AutoencoderKL`` config. LDM numbers decoder levels bottom-up."""
    rules = [ModuleRule(d, ldm) for d, ldm in VAE_TOP_LEVEL.items()]
    layers = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    for level in range(levels):
        for layer in range(layers):
            rules.append(
                ModuleRule(
                    f"encoder.down_blocks.{level}.resnets.{layer}",
                    f"encoder.down.{level}.block.{layer}",
                    VAE_RESNET_PARTS,
                )
            )
        if level != levels - 1:
            rules.append(
                ModuleRule(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv")
            )
    for level in range(levels):
        ldm_level = levels - 1 - level
        for layer in range(layers + 1):
            rules.append(
                ModuleRule(
                    f"decoder.up_blocks.{level}.resnets.{layer}",
                    f"decoder.up.{ldm_level}.block.{layer}",
                    VAE_RESNET_PARTS,
                )
            )
        if level != levels - 1:
            rules.append(
                ModuleRule(f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv")
            )
    for side in ("encoder", "decoder"):
        rules += [
            ModuleRule(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET_PARTS),
            ModuleRule(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET_PARTS),
            ModuleRule(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION_PARTS, True),
        ]
    return rules


def _rename_part(rest: str, parts: Mapping[str, str]) -> str:
    for old, new in parts.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def index_rules(rules: Iterable[ModuleRule]) -> dict[str, ModuleRule]:
    """Rules keyed by their diffusers module name, the form :func:`map_key` looks up."""
    return {r.diffusers: r for r in rules}


def map_key(key: str, by_prefix: Mapping[str, ModuleRule]) -> tuple[str, ModuleRule]:
    """Return the LDM name of one diffusers key, and the rule that mapped it."""
    pieces = key.split(".")
    for cut in range(len(pieces) - 1, 0, -1):
        rule = by_prefix.get(".".join(pieces[:cut]))
        if rule is not None:
            rest = _rename_part(".".join(pieces[cut:]), rule.parts)
            return f"{rule.ldm}.{rest}", rule
    raise KeyError(f"no LDM mapping for diffusers key {key!r}")


def _convert(state_dict: Mapping[str, torch.Tensor], rules: list[ModuleRule], prefix: str) -> dict[str, torch.Tensor]:
    by_prefix = index_rules(rules)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        ldm_key, rule = map_key(key, by_prefix)
        if rule.linear_to_conv and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[prefix + ldm_key] = tensor
    return out


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict -> ``model.diffusion_model.*`` keys."""
    return _convert(state_dict, unet_rules(config), UNET_PREFIX)


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys."""
    return _convert(state_dict, vae_rules(config), VAE_PREFIX)


def text_encoder_to_ldm(
    state_dict: Mapping[str, torch.Tensor], prefix: str = TEXT_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` state dict -> ``cond_stage_model.transformer.text_model.*``.

    transformers 5 flattened ``CLIPTextModel`` and dropped the ``text_model.`` level from its
    state-dict keys; the original layout (and diffusers' detection of a CLIP text encoder in a
    single file) needs it, so it is added back when missing.
    """
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue  # a buffer, not a weight; diffusers does not need it
        name = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + name] = tensor
    return out


def _open_clip_layer_key(rest: str) -> str:
    """``encoder.layers.3.mlp.fc1.weight`` -> ``transformer.resblocks.3.mlp.c_fc.weight``."""
    pieces = rest.split(".")
    if len(pieces) < 4 or pieces[:2] != ["encoder", "layers"]:
        raise KeyError(f"no open_clip mapping for text encoder key {rest!r}")
    inner = _rename_part(".".join(pieces[3:]), OPEN_CLIP_LAYER_PARTS)
    if inner == ".".join(pieces[3:]):
        raise KeyError(f"no open_clip mapping for text encoder key {rest!r}")
    return f"transformer.resblocks.{pieces[2]}.{inner}"


def open_clip_to_ldm(
    state_dict: Mapping[str, torch.Tensor], prefix: str = SDXL_OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` state dict -> open_clip names (SDXL's second encoder).

    q/k/v projections are fused into ``in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked on dim 0),
    and the projection is stored transposed, as open_clip multiplies ``x @ text_projection``.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        rest = key.removeprefix("text_model.")
        if rest in OPEN_CLIP_TOP_LEVEL:
            out[prefix + OPEN_CLIP_TOP_LEVEL[rest]] = tensor
            continue
        pieces = rest.split(".")
        if len(pieces) == 6 and pieces[3] == "self_attn" and pieces[4] in ("q_proj", "k_proj", "v_proj"):
            layer = ".".join(pieces[:3])
            fused.setdefault(f"{layer}.{pieces[5]}", {})[pieces[4]] = tensor
            continue
        out[prefix + _open_clip_layer_key(rest)] = tensor
    for name, parts in fused.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise KeyError(f"incomplete q/k/v projections for {name!r}: {sorted(parts)}")
        layer, kind = name.rsplit(".", 1)  # "encoder.layers.N", "weight" | "bias"
        out[f"{prefix}transformer.resblocks.{layer.rsplit('.', 1)[1]}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]]
        )
    return out


def diffusers_to_ldm(
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_encoder: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Assemble one single-file SD1.x state dict from the three diffusers/transformers parts."""
    out = unet_to_ldm(unet, unet_config)
    out.update(vae_to_ldm(vae, vae_config))
    out.update(text_encoder_to_ldm(text_encoder))
    return out


def sdxl_diffusers_to_ldm(
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Assemble one single-file SDXL state dict (SGM layout) from its diffusers/transformers parts."""
    out = unet_to_ldm(unet, unet_config)
    out.update(vae_to_ldm(vae, vae_config))
    out.update(text_encoder_to_ldm(text_encoder, SDXL_TEXT_ENCODER_PREFIX))
    out.update(open_clip_to_ldm(text_encoder_2))
    return out
