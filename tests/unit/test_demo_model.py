"""The demo checkpoint: a tiny SD1.5 written in the original single-file (LDM / WebUI) layout.

These tests pin the key layout real WebUI checkpoints use, check the file is reproducible, and
check the WebUI model folders get created without shadowing an operator's own checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from devtools.demo_models.sd15 import build_demo_checkpoint, build_demo_models, ensure_demo_checkpoint
from tests.fake_files import write_model_file
from worker.engine import ldm_layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# key -> expected shape, one or more per kind of mapping rule in ldm_layout.
WELL_KNOWN_KEYS = {
    # UNet: top level, resnet parts, transformer, samplers, middle block, decoder side.
    "model.diffusion_model.time_embed.0.weight": (128, 32),
    "model.diffusion_model.time_embed.2.bias": (128,),
    "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (32,),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (32, 128),
    "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 32),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (256, 32),
    "model.diffusion_model.input_blocks.2.0.op.weight": (32, 32, 3, 3),
    "model.diffusion_model.input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
    "model.diffusion_model.middle_block.1.proj_out.weight": (64, 64, 1, 1),
    "model.diffusion_model.middle_block.2.out_layers.3.bias": (64,),
    "model.diffusion_model.output_blocks.1.1.conv.weight": (64, 64, 3, 3),  # upsampler, no attention
    "model.diffusion_model.output_blocks.3.2.conv.weight": (64, 64, 3, 3),  # upsampler after attention
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_out.0.weight": (32, 32),
    "model.diffusion_model.out.0.weight": (32,),
    "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
    # VAE: LDM names, decoder levels numbered bottom-up, attention as 1x1 convs.
    "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
    "first_stage_model.encoder.down.0.block.0.conv1.weight": (32, 32, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
    "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight": (64, 32, 1, 1),
    "first_stage_model.encoder.mid.block_1.norm1.weight": (64,),
    "first_stage_model.encoder.mid.attn_1.q.weight": (64, 64, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (64, 64, 1, 1),
    "first_stage_model.encoder.mid.attn_1.norm.bias": (64,),
    "first_stage_model.encoder.norm_out.weight": (64,),
    "first_stage_model.encoder.conv_out.weight": (8, 64, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "first_stage_model.decoder.mid.attn_1.v.weight": (64, 64, 1, 1),
    "first_stage_model.decoder.up.3.block.1.conv2.weight": (64, 64, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (64, 64, 3, 3),
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (32, 64, 1, 1),
    "first_stage_model.decoder.norm_out.weight": (32,),
    # Text encoder: transformers' CLIPTextModel under cond_stage_model.transformer.text_model.
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 32),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 32),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
    "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc2.weight": (32, 64),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo-tiny.safetensors")


def test_keys_follow_the_original_single_file_layout(demo_file: Path) -> None:
    with safe_open(str(demo_file), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        metadata = f.metadata()
    assert metadata == {"renderfarm_arch": "demo-tiny"}
    for key, shape in WELL_KNOWN_KEYS.items():
        assert key in shapes, f"missing {key}"
        assert shapes[key] == shape, key
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in shapes)
    # No diffusers-style names leaked through.
    leaked = ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_shortcut", "to_q.")
    assert not [k for k in shapes if any(word in k for word in leaked) and "transformer_blocks" not in k]


def test_file_is_small_fp16_and_every_weight_is_written(demo_file: Path) -> None:
    assert demo_file.stat().st_size < 12_000_000
    unet, vae, text_encoder = build_demo_models(0)
    expected = sum(len(m.state_dict()) for m in (unet, vae, text_encoder))
    with safe_open(str(demo_file), "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
    assert len(keys) == expected


def test_same_seed_gives_byte_identical_file(demo_file: Path, tmp_path: Path) -> None:
    again = build_demo_checkpoint(tmp_path / "again.safetensors", seed=0)
    other = build_demo_checkpoint(tmp_path / "other.safetensors", seed=1)
    assert again.read_bytes() == demo_file.read_bytes()
    assert other.read_bytes() != demo_file.read_bytes()


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_demo_models(5)
    assert torch.equal(torch.rand(3), expected)


def test_vae_attention_weights_become_1x1_convs() -> None:
    sd = {"encoder.mid_block.attentions.0.to_q.weight": torch.ones(4, 4)}
    out = ldm_layout.vae_to_ldm(sd, {"layers_per_block": 1, "block_out_channels": [4, 4]})
    assert out["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (4, 4, 1, 1)


def test_unknown_keys_are_refused_not_dropped() -> None:
    with pytest.raises(KeyError, match="no LDM mapping"):
        ldm_layout.vae_to_ldm(
            {"encoder.something_new.weight": torch.ones(1)},
            {
                "layers_per_block": 1,
                "block_out_channels": [4, 4],
            },
        )


def test_ensure_creates_folders_and_demo_once(tmp_path: Path) -> None:
    created = ensure_demo_checkpoint(tmp_path)
    assert created == tmp_path / "Stable-diffusion" / "demo-tiny.safetensors"
    assert created.is_file()
    for folder in ("Stable-diffusion", "Lora", "VAE", "embeddings"):
        assert (tmp_path / folder).is_dir()
    assert ensure_demo_checkpoint(tmp_path) is None  # already there: nothing rebuilt
    assert not [p for p in (tmp_path / "Stable-diffusion").iterdir() if p.name.startswith(".")]


def test_ensure_does_not_shadow_existing_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "Stable-diffusion").mkdir()
    write_model_file(tmp_path / "Stable-diffusion" / "mine.safetensors", b"x")
    assert ensure_demo_checkpoint(tmp_path) is None
    assert sorted(p.name for p in (tmp_path / "Stable-diffusion").iterdir()) == ["mine.safetensors"]
    assert (tmp_path / "Lora").is_dir()


def test_cli_writes_into_given_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from devtools.demo_models.sd15 import main

    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "Stable-diffusion" / "demo-tiny.safetensors").is_file()
    assert "wrote" in capsys.readouterr().out
