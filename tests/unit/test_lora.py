"""LoRA on the demo model at 64x64, 2 steps: formats, weights, the cache's tiers, no leakage, infotext."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from devtools.demo_models.lora_sd15 import write_demo_lora
from devtools.demo_models.sd15 import build_demo_checkpoint
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.webui.hashes import lora_short_hash
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.engine import GenerationEngine
from worker.engine.lora import LoraCache, StateDictCache, job_loras

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = {
    "mode": "txt2img", "prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 2,
    "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic", "seed": 1234, "subseed": 99,
    "subseed_strength": 0.0, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "model": "demo",
    "vae": None, "clip_skip": 1, "eta_noise_seed_delta": 0,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_demo_checkpoint(tmp_path_factory.mktemp("lora-ckpt") / "demo.safetensors")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-models")
    lora = root / "Lora"
    write_demo_lora(lora / "alpha.safetensors", seed=1, fmt="kohya")
    write_demo_lora(lora / "alpha-diffusers.safetensors", seed=1, fmt="diffusers")
    write_demo_lora(lora / "beta.safetensors", seed=2, fmt="kohya", text_encoder=False)  # UNet only
    return root


def fresh(checkpoint: Path):
    return load_pipeline(checkpoint)


def render(engine: GenerationEngine, pipe, cache: LoraCache | None = None, **params) -> np.ndarray:
    job = {**BASE, **params}
    image = engine.render(pipe, RenderSpec.from_stored(job), dict(pipe.scheduler.config), loras=cache)[0]
    return np.asarray(image.image)


def entry(name: str, weight: float = 1.0, file: str | None = None) -> dict[str, object]:
    return {"name": name, "weight": weight, "file": file or f"{name}.safetensors", "hash": "0123456789ab"}


def test_lora_changes_output_and_weight_matters(models_dir: Path, checkpoint: Path) -> None:
    engine, pipe = GenerationEngine(models_dir), fresh(checkpoint)
    cache = LoraCache()
    base = render(engine, pipe, cache)
    full = render(engine, pipe, cache, loras=[entry("alpha", 1.0)])
    half = render(engine, pipe, cache, loras=[entry("alpha", 0.5)])
    assert not np.array_equal(base, full)
    assert not np.array_equal(full, half)
    assert not np.array_equal(base, half)


def test_kohya_and_diffusers_formats_give_the_same_pixels(models_dir: Path, checkpoint: Path) -> None:
    engine = GenerationEngine(models_dir)
    kohya = render(engine, fresh(checkpoint), LoraCache(), loras=[entry("alpha", 0.8)])
    diffusers_file = entry("alpha", 0.8, "alpha-diffusers.safetensors")
    diffusers = render(engine, fresh(checkpoint), LoraCache(), loras=[diffusers_file])
    assert np.array_equal(kohya, diffusers)


def test_no_lora_after_lora_equals_a_fresh_pipeline(models_dir: Path, checkpoint: Path) -> None:
    engine = GenerationEngine(models_dir)
    expected = render(engine, fresh(checkpoint), LoraCache())
    pipe, cache = fresh(checkpoint), LoraCache()
    render(engine, pipe, cache, loras=[entry("alpha"), entry("beta", 0.7)])
    assert np.array_equal(render(engine, pipe, cache), expected)
    assert np.array_equal(render(engine, pipe, cache, loras=[]), expected)


def test_a_after_a_plus_b_equals_a_on_a_fresh_pipeline(models_dir: Path, checkpoint: Path) -> None:
    engine = GenerationEngine(models_dir)
    expected = render(engine, fresh(checkpoint), LoraCache(), loras=[entry("alpha", 0.9)])
    pipe, cache = fresh(checkpoint), LoraCache()
    render(engine, pipe, cache, loras=[entry("alpha", 0.9), entry("beta", 1.0)])
    assert np.array_equal(render(engine, pipe, cache, loras=[entry("alpha", 0.9)]), expected)
    # B after A+B, too: the UNet-only LoRA alone, with the text-encoder part of A switched off
    b_fresh = render(engine, fresh(checkpoint), LoraCache(), loras=[entry("beta")])
    assert np.array_equal(render(engine, pipe, cache, loras=[entry("beta")]), b_fresh)


def test_prompt_tags_are_the_fallback_when_the_job_has_no_loras_field(models_dir: Path, checkpoint: Path) -> None:
    engine, pipe, cache = GenerationEngine(models_dir), fresh(checkpoint), LoraCache()
    from_field = render(engine, pipe, cache, loras=[entry("alpha", 0.6)])
    from_tag = render(engine, pipe, cache, prompt="a lighthouse <lora:alpha:0.6>")
    assert np.array_equal(from_field, from_tag)


def test_cached_switch_reads_no_file(models_dir: Path, checkpoint: Path) -> None:
    reads: list[str] = []

    def counting_loader(path: str) -> dict[str, torch.Tensor]:
        reads.append(path)
        return load_file(path)

    engine, pipe = GenerationEngine(models_dir), fresh(checkpoint)
    cache = LoraCache(StateDictCache(loader=counting_loader))
    render(engine, pipe, cache, loras=[entry("alpha")])
    render(engine, pipe, cache, loras=[entry("beta")])
    assert len(reads) == 2 and cache.adapter_loads == 2
    for loras in ([entry("alpha", 0.5)], [], [entry("beta"), entry("alpha")], [entry("alpha")]):
        render(engine, pipe, cache, loras=loras)
    assert len(reads) == 2 and cache.files.reads == 2 and cache.adapter_loads == 2


def test_evicted_adapter_reloads_from_ram_not_disk(models_dir: Path, checkpoint: Path) -> None:
    engine, pipe = GenerationEngine(models_dir), fresh(checkpoint)
    cache = LoraCache(max_resident=1)
    first = render(engine, pipe, cache, loras=[entry("alpha")])
    render(engine, pipe, cache, loras=[entry("beta")])
    assert cache.resident() == ["beta"]
    assert np.array_equal(render(engine, pipe, cache, loras=[entry("alpha")]), first)
    assert cache.files.reads == 2 and cache.adapter_loads == 3
    assert len(pipe.get_list_adapters()["unet"]) == 1


def test_ram_tier_is_bounded_by_count_and_bytes(models_dir: Path) -> None:
    files = StateDictCache(max_count=1)
    lora = models_dir / "Lora"
    files.get("a", lora / "alpha.safetensors")
    files.get("b", lora / "beta.safetensors")
    files.get("a", lora / "alpha.safetensors")
    assert files.reads == 3
    small = StateDictCache(max_bytes=1)
    small.get("a", lora / "alpha.safetensors")
    small.get("b", lora / "beta.safetensors")
    assert small.nbytes > 0 and small.reads == 2 and len(small._items) == 1


def test_infotext_has_lora_hashes(models_dir: Path, checkpoint: Path) -> None:
    engine, pipe = GenerationEngine(models_dir), fresh(checkpoint)
    job = {**BASE, "prompt": "x <lora:alpha:0.7> <lora:beta>"}
    info = engine.render(pipe, RenderSpec.from_stored(job), dict(pipe.scheduler.config))[0].infotext
    lora = models_dir / "Lora"
    assert info["Lora hashes"] == (f"alpha: {lora_short_hash(lora / 'alpha.safetensors')}, "
                                   f"beta: {lora_short_hash(lora / 'beta.safetensors')}")
    job = {**BASE, "loras": [entry("alpha")]}
    info = engine.render(pipe, RenderSpec.from_stored(job), dict(pipe.scheduler.config))[0].infotext
    assert info["Lora hashes"] == "alpha: 0123456789ab"
    plain = engine.render(pipe, RenderSpec.from_stored(BASE), dict(pipe.scheduler.config))[0]
    assert "Lora hashes" not in plain.infotext


@pytest.mark.parametrize("file", ["../alpha.safetensors", "/etc/passwd", "missing.safetensors", "alpha.ckpt"])
def test_bad_lora_files_are_field_errors(models_dir: Path, file: str) -> None:
    with pytest.raises(FieldError):
        job_loras(RenderSpec.from_stored({**BASE, "loras": [entry("x", file=file)]}), models_dir / "Lora")
    with pytest.raises(FieldError):
        job_loras(RenderSpec.from_stored({**BASE, "prompt": "<lora:nope:1>"}), models_dir / "Lora")
