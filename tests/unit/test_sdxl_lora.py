"""LoRA on the tiny SDXL at 64x64, 2 steps: kohya (SGM names, te1/te2) and diffusers files, each part's effect,
mixing with weights, no leakage through the adapter cache, and the infotext's ``Lora hashes``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from devtools.demo_models.lora_sd15 import write_demo_lora
from devtools.demo_models.lora_sdxl import write_demo_sdxl_lora
from devtools.demo_models.sdxl import build_demo_sdxl_checkpoint
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.webui.hashes import lora_short_hash
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.engine import GenerationEngine
from worker.engine.lora import LoraCache, lora_components

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = {
    "mode": "txt2img", "prompt": "a lighthouse, (stormy sea:1.2)", "negative_prompt": "blurry", "steps": 2,
    "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic", "seed": 1234, "subseed": 99,
    "subseed_strength": 0.0, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "model": "xl",
    "vae": None, "clip_skip": 1, "eta_noise_seed_delta": 0,
}
PARTS = {"unet": ("unet",), "te1": ("text_encoder",), "te2": ("text_encoder_2",)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_sdxl_checkpoint(tmp_path_factory.mktemp("xl-lora-ckpt") / "tiny-xl.safetensors")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lora = tmp_path_factory.mktemp("xl-lora-models") / "Lora"
    write_demo_sdxl_lora(lora / "alpha.safetensors", seed=1, fmt="kohya")
    write_demo_sdxl_lora(lora / "alpha-diffusers.safetensors", seed=1, fmt="diffusers")
    write_demo_sdxl_lora(lora / "beta.safetensors", seed=2, fmt="kohya", parts=("unet",))
    write_demo_sdxl_lora(lora / "beta-diffusers.safetensors", seed=2, fmt="diffusers", parts=("unet",))
    for label, parts in PARTS.items():  # alpha's factors, one part at a time
        write_demo_sdxl_lora(lora / f"alpha-{label}.safetensors", seed=1, fmt="kohya", parts=parts)
    write_demo_lora(lora / "sd15.safetensors", seed=1, fmt="kohya")  # a LoRA for the SD1.5 demo model
    return lora.parent


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> GenerationEngine:
    return GenerationEngine(models_dir)


def render(engine: GenerationEngine, pipe, cache: LoraCache | None, **params) -> np.ndarray:
    job = RenderSpec.from_stored({**BASE, **params})
    image = engine.render(pipe, job, dict(pipe.scheduler.config), loras=cache)[0]
    return np.asarray(image.image)


def entry(name: str, weight: float = 1.0, file: str | None = None) -> dict[str, object]:
    return {"name": name, "weight": weight, "file": file or f"{name}.safetensors", "hash": "0123456789ab"}


def lora_layers(pipe) -> dict[str, int]:
    return {type(part).__name__ + f"#{i}": sum(hasattr(m, "lora_A") and hasattr(m, "set_scale") for m in part.modules())
            for i, part in enumerate(lora_components(pipe))}


def test_demo_files_use_the_kohya_sdxl_and_diffusers_layouts(models_dir: Path, checkpoint: Path,
                                                             engine: GenerationEngine) -> None:
    kohya = load_file(str(models_dir / "Lora" / "alpha.safetensors"))
    diffusers = load_file(str(models_dir / "Lora" / "alpha-diffusers.safetensors"))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya  # SGM names
    assert "lora_unet_middle_block_1_proj_in.alpha" in kohya
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight" in kohya
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in diffusers
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in diffusers
    modules = {key.split(".")[0] for key in kohya}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    assert len(modules) * 2 == len(diffusers)
    # Every module the kohya file names becomes a LoRA layer: nothing is dropped by the key conversion.
    pipe = load_pipeline(checkpoint)
    render(engine, pipe, LoraCache(), loras=[entry("alpha")])
    per_part = {prefix: sum(m.startswith(prefix) for m in modules) for prefix in ("lora_unet", "lora_te1", "lora_te2")}
    assert list(lora_layers(pipe).values()) == list(per_part.values())
    assert all(count > 0 for count in per_part.values())


def test_kohya_and_diffusers_formats_give_the_same_pixels(engine: GenerationEngine, checkpoint: Path) -> None:
    kohya = render(engine, load_pipeline(checkpoint), LoraCache(), loras=[entry("alpha", 0.8), entry("beta", 0.6)])
    diffusers = render(engine, load_pipeline(checkpoint), LoraCache(),
                       loras=[entry("alpha", 0.8, "alpha-diffusers.safetensors"),
                              entry("beta", 0.6, "beta-diffusers.safetensors")])
    assert np.array_equal(kohya, diffusers)


def test_lora_changes_output_each_part_matters_and_weight_matters(engine: GenerationEngine, checkpoint: Path) -> None:
    pipe, cache = load_pipeline(checkpoint), LoraCache()
    base = render(engine, pipe, cache)
    full = render(engine, pipe, cache, loras=[entry("alpha")])
    half = render(engine, pipe, cache, loras=[entry("alpha", 0.5)])
    assert not np.array_equal(base, full) and not np.array_equal(full, half) and not np.array_equal(base, half)
    outputs = {label: render(engine, pipe, cache, loras=[entry(f"alpha-{label}")]) for label in PARTS}
    for label, pixels in outputs.items():
        assert not np.array_equal(pixels, base), f"the {label} part of the LoRA changed nothing"
        assert not np.array_equal(pixels, full), f"the {label} part alone equals the whole LoRA"
    # The three single-part files together are the whole LoRA, pixel for pixel.
    together = render(engine, pipe, cache, loras=[entry(f"alpha-{label}") for label in PARTS])
    assert np.array_equal(together, full)


def test_mixing_two_loras_matches_diffusers_set_adapters(engine: GenerationEngine, checkpoint: Path,
                                                        models_dir: Path) -> None:
    pipe, cache = load_pipeline(checkpoint), LoraCache()
    mixed = render(engine, pipe, cache, loras=[entry("alpha", 0.7), entry("beta", 0.4)])
    assert not np.array_equal(render(engine, pipe, cache, loras=[entry("alpha", 0.7), entry("beta", 0.8)]), mixed)
    assert not np.array_equal(render(engine, pipe, cache, loras=[entry("alpha", 0.7)]), mixed)
    assert cache.adapter_loads == 2 and cache.files.reads == 2  # switches reuse the resident adapters
    # diffusers' own API on a fresh pipeline: load both adapters, set_adapters with the same weights.
    reference = load_pipeline(checkpoint)
    for name in ("alpha", "beta"):
        state = {k: v.float() for k, v in load_file(str(models_dir / "Lora" / f"{name}.safetensors")).items()}
        reference.load_lora_weights(state, adapter_name=name)
    reference.set_adapters(["alpha", "beta"], [0.7, 0.4])
    assert np.array_equal(render(engine, reference, LoraCache()), mixed)


def test_no_lora_after_loras_equals_a_fresh_pipeline(engine: GenerationEngine, checkpoint: Path) -> None:
    expected = render(engine, load_pipeline(checkpoint), LoraCache())
    pipe, cache = load_pipeline(checkpoint), LoraCache()
    render(engine, pipe, cache, loras=[entry("alpha"), entry("beta", 0.7)])
    assert np.array_equal(render(engine, pipe, cache), expected)
    assert np.array_equal(render(engine, pipe, cache, loras=[]), expected)


def test_a_after_a_plus_b_equals_a_on_a_fresh_pipeline(engine: GenerationEngine, checkpoint: Path) -> None:
    expected = render(engine, load_pipeline(checkpoint), LoraCache(), loras=[entry("alpha", 0.9)])
    pipe, cache = load_pipeline(checkpoint), LoraCache()
    render(engine, pipe, cache, loras=[entry("alpha", 0.9), entry("beta", 1.0)])
    assert np.array_equal(render(engine, pipe, cache, loras=[entry("alpha", 0.9)]), expected)
    # B (UNet only) after A+B: A's text-encoder parts, both encoders, must be switched off too.
    b_fresh = render(engine, load_pipeline(checkpoint), LoraCache(), loras=[entry("beta")])
    assert np.array_equal(render(engine, pipe, cache, loras=[entry("beta")]), b_fresh)
    te2_fresh = render(engine, load_pipeline(checkpoint), LoraCache(), loras=[entry("alpha-te2")])
    assert np.array_equal(render(engine, pipe, cache, loras=[entry("alpha-te2")]), te2_fresh)


def test_infotext_has_lora_hashes_on_sdxl(engine: GenerationEngine, checkpoint: Path, models_dir: Path) -> None:
    pipe = load_pipeline(checkpoint)
    job = {**BASE, "prompt": "x <lora:alpha:0.7> <lora:beta>"}
    info = engine.render(pipe, RenderSpec.from_stored(job), dict(pipe.scheduler.config))[0].infotext
    lora = models_dir / "Lora"
    assert info["Lora hashes"] == (f"alpha: {lora_short_hash(lora / 'alpha.safetensors')}, "
                                   f"beta: {lora_short_hash(lora / 'beta.safetensors')}")
    plain = engine.render(pipe, RenderSpec.from_stored(BASE), dict(pipe.scheduler.config))[0]
    assert "Lora hashes" not in plain.infotext


def test_an_sd15_lora_on_sdxl_is_a_user_error_and_leaves_nothing_behind(engine: GenerationEngine,
                                                                        checkpoint: Path) -> None:
    pipe, cache = load_pipeline(checkpoint), LoraCache()
    alpha = render(engine, pipe, cache, loras=[entry("alpha")])
    with pytest.raises(FieldError) as err:
        render(engine, pipe, cache, loras=[entry("alpha"), entry("sd15")])
    assert err.value.field == ("body", "loras") and "sd15.safetensors" in err.value.message
    assert cache.resident() == ["alpha"]
    assert np.array_equal(render(engine, pipe, cache, loras=[entry("alpha")]), alpha)
