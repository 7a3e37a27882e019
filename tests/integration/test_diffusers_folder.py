"""Diffusers folders as checkpoints: listed once under their relative path with a stable folder hash,
loaded (SD1.5 and SDXL) with weights equal to the single file they were saved from, renders equal to the
single file's, and refused without unpickling when their weights are .bin pickles or incomplete."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from api.model_catalog import list_checkpoints
from devtools.demo_models.sd15 import build_demo_checkpoint
from devtools.demo_models.sdxl import build_demo_sdxl_checkpoint
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.models.registry import resolve_checkpoint, scan_checkpoints
from shared.webui.hashes import HashCache, legacy_model_hash, sha256_folder
from tests.farm_harness import Farm
from worker.engine.checkpoint_loader import UnsupportedCheckpointError, load_pipeline
from worker.engine.engine import GenerationEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single files plus the diffusers folders saved from them (safetensors), one of them in a subfolder."""
    root = tmp_path_factory.mktemp("models")
    checkpoints = root / "Stable-diffusion"
    sd = build_demo_checkpoint(checkpoints / "demo.safetensors")
    xl = build_demo_sdxl_checkpoint(checkpoints / "xl.safetensors")
    load_pipeline(sd).save_pretrained(checkpoints / "demo-folder", safe_serialization=True)
    load_pipeline(xl).save_pretrained(checkpoints / "folders" / "xl-folder", safe_serialization=True)
    return root


def _assert_same_weights(a, b) -> None:
    for name in COMPONENTS:
        left, right = getattr(a, name, None), getattr(b, name, None)
        assert (left is None) == (right is None), name
        if left is None:
            continue
        expected, actual = left.state_dict(), right.state_dict()
        assert expected.keys() == actual.keys(), name
        assert [k for k in expected if not torch.equal(expected[k], actual[k])] == [], name


@pytest.mark.parametrize(("single", "folder", "kind"), [
    ("demo.safetensors", "demo-folder", "StableDiffusionPipeline"),
    ("xl.safetensors", "folders/xl-folder", "StableDiffusionXLPipeline"),
])
def test_folder_loads_equal_to_the_single_file(models: Path, single: str, folder: str, kind: str) -> None:
    checkpoints = models / "Stable-diffusion"
    from_file, from_folder = load_pipeline(checkpoints / single), load_pipeline(checkpoints / folder)
    assert type(from_folder).__name__ == kind
    _assert_same_weights(from_file, from_folder)
    public = [{k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
              for pipe in (from_file, from_folder)]
    assert public[0] == public[1]
    ids = from_folder.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sdxl_folder_renders_the_same_pixels_as_the_single_file(models: Path) -> None:
    checkpoints = models / "Stable-diffusion"
    engine = GenerationEngine(models)
    params = {"mode": "txt2img", "prompt": "a (lighthouse:1.1)", "negative_prompt": "", "steps": 2,
              "cfg_scale": 6.0, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 77, "subseed": 0,
              "subseed_strength": 0.0, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "vae": None,
              "model": "xl"}
    images = []
    for path in (checkpoints / "xl.safetensors", checkpoints / "folders" / "xl-folder"):
        pipe = load_pipeline(path)
        spec = RenderSpec.from_stored(params)
        images.append(np.asarray(engine.render(pipe, spec, dict(pipe.scheduler.config))[0].image))
    assert np.array_equal(images[0], images[1])


def test_folders_are_listed_once_by_relative_path_with_architecture_and_hash(models: Path) -> None:
    listed = {c.name: c for c in scan_checkpoints(models)}
    assert set(listed) == {"demo", "xl", "demo-folder", "folders/xl-folder"}  # no files from inside folders
    folder = listed["folders/xl-folder"]
    assert folder.is_folder and folder.loadable and folder.filename == "folders/xl-folder"
    weights = sorted((models / "Stable-diffusion/folders/xl-folder").rglob("*.safetensors"))
    assert folder.size == sum(p.stat().st_size for p in weights)
    assert resolve_checkpoint(models, "folders/xl-folder").path == folder.path
    # The documented hash: SHA-256 of the sha256sum-style manifest of the weight files, sorted by path.
    root = folder.path
    manifest = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}\n"
                       for p in sorted(weights, key=lambda p: p.relative_to(root).as_posix()))
    assert sha256_folder(root) == hashlib.sha256(manifest.encode()).hexdigest()
    assert legacy_model_hash(root) == "NOFILE"
    entries = {e.name: e for e in list_checkpoints(models, HashCache())}
    assert entries["folders/xl-folder"].architecture == "sdxl" and entries["demo-folder"].architecture == "sd15"
    assert entries["xl"].architecture == "demo-tiny-sdxl"
    assert entries["folders/xl-folder"].sha256 == sha256_folder(root) and entries["demo-folder"].legacy_hash is None


def test_folder_hash_is_cached_and_follows_weight_changes(models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(models / "Stable-diffusion" / "demo-folder", folder)
    cache = HashCache(tmp_path / "hashes.json")
    first = cache.sha256(folder)
    assert first == sha256_folder(folder) and HashCache(tmp_path / "hashes.json").sha256(folder) == first
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")  # configs are not part of the hash
    assert sha256_folder(folder) == first
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    data[-1] ^= 1
    vae.write_bytes(bytes(data))
    assert cache.sha256(folder) == sha256_folder(folder) != first


class _Trap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_weight_folder_is_refused_without_unpickling(models: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = root / "Stable-diffusion" / "pickled"
    shutil.copytree(models / "Stable-diffusion" / "demo-folder", folder)
    marker = tmp_path / "unpickled.marker"
    for weights in folder.rglob("*.safetensors"):
        weights.with_name(weights.name.replace(".safetensors", ".bin")).write_bytes(pickle.dumps(_Trap(marker)))
        weights.unlink()
    (listed,) = scan_checkpoints(root)
    assert listed.name == "pickled" and not listed.loadable and ".bin" in (listed.refused_reason or "")
    with pytest.raises(FieldError, match="refused"):
        resolve_checkpoint(root, "pickled")
    with pytest.raises(UnsupportedCheckpointError, match="pickle"):
        load_pipeline(folder)
    assert list_checkpoints(root, HashCache())[0].hash is None
    assert not marker.exists()
    pickle.loads((folder / "unet" / "diffusion_pytorch_model.bin").read_bytes())  # the trap is real
    assert marker.exists()


def test_incomplete_or_foreign_folders_are_refused(models: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(models / "Stable-diffusion" / "demo-folder", folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(unet))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(unet))
    with pytest.raises(UnsupportedCheckpointError, match="incomplete unet weights") as info:
        load_pipeline(folder)
    assert dropped in str(info.value)
    index = folder / "model_index.json"
    index.write_text(index.read_text().replace("StableDiffusionPipeline", "StableDiffusion3Pipeline"))
    with pytest.raises(UnsupportedCheckpointError, match="not supported"):
        load_pipeline(folder)


@pytest.fixture
def farm_folder(api_only: Farm, models_dir: Path, models: Path) -> Iterator[Path]:
    """A diffusers folder added to the shared models folder while the API runs, removed afterwards."""
    target = models_dir / "Stable-diffusion" / "zz-folders" / "xl-folder"
    shutil.copytree(models / "Stable-diffusion" / "folders" / "xl-folder", target)
    yield target
    shutil.rmtree(target.parent)


def test_api_lists_the_folder_with_its_architecture(api_only: Farm, farm_folder: Path) -> None:
    with api_only.client() as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()}
    entry = models["zz-folders/xl-folder"]
    assert entry["architecture"] == "sdxl" and entry["loadable"] is True and entry["legacy_hash"] is None
    assert entry["sha256"] == sha256_folder(farm_folder)
    assert entry["title"] == f"zz-folders/xl-folder [{entry['hash']}]"
    assert models["demo-tiny"]["architecture"] == "demo-tiny"
