"""The warm pipeline cache: a byte budget (and optional count limit), least recently used evicted first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from devtools.demo_models.sd15 import build_demo_checkpoint
from shared.settings import ModelSettings, Settings, WorkerSettings
from worker.engine.pipeline_cache import PipelineCache, estimate_checkpoint_bytes, pipeline_bytes


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache-models")
    for seed, name in enumerate(("a", "b", "c")):
        build_demo_checkpoint(root / "Stable-diffusion" / f"{name}.safetensors", seed=seed)
    return root


def cache(models: Path, budget: int = 0, max_models: int = 0) -> PipelineCache:
    settings = Settings(models=ModelSettings(models_dir=models),
                        worker=WorkerSettings(pipeline_cache_bytes=budget, pipeline_cache_models=max_models))
    changes: list[list[str]] = []
    pipelines = PipelineCache(settings, "cpu", torch.float32)
    pipelines.on_change = lambda: changes.append(pipelines.names())
    pipelines.changes = changes  # type: ignore[attr-defined]
    return pipelines


def test_the_estimate_from_headers_matches_the_loaded_size(three_models: Path) -> None:
    pipelines = cache(three_models)
    loaded = pipelines.get("a")
    estimate = estimate_checkpoint_bytes(loaded.path, float_bytes=4)
    assert loaded.nbytes == pipeline_bytes(loaded.pipeline) > 0
    assert abs(estimate - loaded.nbytes) / loaded.nbytes < 0.02, (estimate, loaded.nbytes)
    assert estimate_checkpoint_bytes(loaded.path, float_bytes=2) < 0.6 * estimate


def test_a_budget_for_two_models_evicts_the_least_recently_used(three_models: Path) -> None:
    one = cache(three_models).get("a").nbytes
    pipelines = cache(three_models, budget=int(one * 2.5))
    pipelines.get("a")
    pipelines.get("b")
    pipelines.get("a")  # a is now the most recently used
    assert pipelines.loads == 2
    pipelines.get("c")
    assert pipelines.names() == ["a", "c"], "b was the least recently used"
    assert pipelines.evictions == 1 and pipelines.loads == 3
    assert pipelines.used_bytes() <= pipelines.budget
    assert pipelines.changes[-1] == ["a", "c"]  # the heartbeat was told at once


def test_a_model_larger_than_the_budget_still_loads_alone(three_models: Path) -> None:
    pipelines = cache(three_models, budget=1000)
    pipelines.get("a")
    pipelines.get("b")
    assert pipelines.names() == ["b"]


def test_count_limit_and_names_by_file_name(three_models: Path) -> None:
    pipelines = cache(three_models, max_models=1)
    first = pipelines.get("a")
    assert pipelines.get("a.safetensors") is first and pipelines.loads == 1
    pipelines.get("b")
    assert pipelines.names() == ["b"] and pipelines.evictions == 1


def test_a_diffusers_folder_is_estimated_once_per_component(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "folder"
    for component, variants in (("unet", ("", ".fp16")), ("vae", (".fp16",))):
        (folder / component).mkdir(parents=True)
        for variant in variants:
            save_file({"w": torch.zeros(10, 10)}, str(folder / component / f"model{variant}.safetensors"))
    # unet: the plain file only (the loader's choice); vae: its only file, the fp16 variant
    assert estimate_checkpoint_bytes(folder, float_bytes=4) == 2 * 100 * 4


def test_controlnets_share_the_budget_and_never_push_out_the_pipeline_rendering(three_models: Path) -> None:
    from devtools.demo_models.controlnet import build_demo_controlnet

    build_demo_controlnet(three_models / "ControlNet" / "cn.safetensors")
    location = (three_models / "ControlNet" / "cn.safetensors").relative_to(three_models.parent).as_posix()
    counted = cache(three_models, max_models=1)
    counted.get("a")
    first = counted.controlnet(location, "cn [x]")
    assert counted.controlnet(location) is first and counted.names() == ["a"], "the count limit counts pipelines"
    assert counted.controlnets() == ["cn [x]"]
    one = cache(three_models).get("a").nbytes
    tight = cache(three_models, budget=int(one * 1.1))
    tight.get("b")
    tight.controlnet(location)
    assert tight.names() == ["b"], "the pipeline in use stays even over the budget"
    tight.get("c")
    assert tight.names() == ["c"] and tight.controlnets() == [], "least recently used first: b, then the ControlNet"
    with pytest.raises(ValueError, match="not installed"):
        tight.controlnet("../../etc/passwd")
