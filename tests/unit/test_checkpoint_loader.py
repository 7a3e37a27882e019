"""Single-file checkpoint loading: detection from headers, refusal of unsafe or foreign files,
an offline load whose weights round-trip bit for bit, and a deterministic tiny render.

Large architectures are tested with header-only files: a valid safetensors header followed by
a sparse (all-zero, unallocated) data section, so an SD1.5-shaped file costs no disk or RAM.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devtools.demo_models.sd15 import build_demo_checkpoint, build_demo_models, demo_state_dict
from worker.engine import (
    UnsupportedCheckpointError,
    checkpoint_config_dir,
    detect_architecture,
    load_pipeline,
)
from worker.engine.checkpoint_loader import expected_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]

SD15_PROBES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
}


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict | None = None) -> Path:
    """A valid fp16 safetensors file whose data section is a sparse run of zeros."""
    header: dict = {}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo-tiny.safetensors")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make any IP connection or DNS lookup fail loudly, and record the attempt."""
    attempts: list = []
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test forbids network access: {address}")
        return real_connect(self, address)

    def guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> None:
        attempts.append(host)
        raise OSError(f"test forbids DNS lookups: {host}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


# --- detection -------------------------------------------------------------------------------


def test_detects_demo_from_metadata(demo_file: Path) -> None:
    assert detect_architecture(demo_file) == "demo-tiny"


def test_detects_sd15_from_shapes_alone(tmp_path: Path) -> None:
    path = write_header_only(tmp_path / "realistic.safetensors", SD15_PROBES)
    with safe_open(str(path), "pt") as f:  # the crafted file is a real safetensors file
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape() == [320, 4, 3, 3]
    assert detect_architecture(path) == "sd15"


def test_detects_sdxl_from_its_second_text_encoder(tmp_path: Path) -> None:
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    }
    path = write_header_only(tmp_path / "xl.safetensors", shapes)
    assert detect_architecture(path) == "sdxl"
    del shapes["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"]
    with pytest.raises(UnsupportedCheckpointError, match="two text encoders"):
        detect_architecture(write_header_only(tmp_path / "odd-xl.safetensors", shapes))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({**SD15_PROBES, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                "cond_stage_model.model.token_embedding.weight": (49408, 1024),
            },
            "2.x",
        ),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1)}, "no Stable Diffusion"),
        (
            {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
            "no 768-wide CLIP text encoder",
        ),
    ],
    ids=["inpainting", "sd2", "lora", "no-text-encoder"],
)
def test_refuses_other_model_families(tmp_path: Path, shapes: dict, message: str) -> None:
    path = write_header_only(tmp_path / "other.safetensors", shapes)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        detect_architecture(path)


def test_refuses_unknown_metadata_tag(tmp_path: Path) -> None:
    path = write_header_only(tmp_path / "x.safetensors", SD15_PROBES, {"renderfarm_arch": "flux"})
    with pytest.raises(UnsupportedCheckpointError, match="unknown renderfarm_arch"):
        detect_architecture(path)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x01\x02", b"\xff" * 64, struct.pack("<Q", 10) + b"not json!!", struct.pack("<Q", 4) + b"[1] "],
    ids=["empty", "short", "huge-length", "not-json", "not-a-map"],
)
def test_refuses_corrupt_safetensors(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(payload)
    with pytest.raises(UnsupportedCheckpointError):
        detect_architecture(path)
    assert issubclass(UnsupportedCheckpointError, ValueError)


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "model"])
def test_refuses_pickle_formats_without_opening_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04pickle data that must never be read")
    opened: list = []
    real_open = Path.open

    def spy_open(self: Path, *args: object, **kwargs: object) -> object:
        opened.append(self)
        return real_open(self, *args, **kwargs)

    def no_torch_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(Path, "open", spy_open)
    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(UnsupportedCheckpointError, match="only .safetensors"):
        detect_architecture(path)
    with pytest.raises(UnsupportedCheckpointError, match="only .safetensors"):
        load_pipeline(path)
    assert path not in opened


def test_config_dirs_are_bundled() -> None:
    for arch in ("sd15", "demo-tiny", "sdxl", "demo-tiny-sdxl"):
        folder = checkpoint_config_dir(arch)
        for part in (
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "scheduler/scheduler_config.json",
        ):
            assert (folder / part).is_file(), f"{arch}: {part}"
        # The tokenizers come from the one copy in worker/assets/clip_tokenizer (bundled_tokenizers).
        assert not (folder / "tokenizer").exists()
    with pytest.raises(UnsupportedCheckpointError):
        checkpoint_config_dir("sd3")


def test_sd15_expected_weights_match_the_real_layout() -> None:
    expected = expected_weights(checkpoint_config_dir("sd15"))
    # Tensor counts of the original SD1.5 checkpoint (v1-5-pruned-emaonly), per component.
    assert sum(k.startswith("model.diffusion_model.") for k in expected) == 686
    assert sum(k.startswith("first_stage_model.") for k in expected) == 248
    assert sum(k.startswith("cond_stage_model.transformer.text_model.") for k in expected) == 196
    known = {
        "model.diffusion_model.input_blocks.3.0.op.weight": 320 * 320 * 9,
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": 1280 * 1280 * 9,
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": 1280 * 768,
        "model.diffusion_model.output_blocks.2.1.conv.weight": 1280 * 1280 * 9,
        "model.diffusion_model.output_blocks.5.2.conv.weight": 1280 * 1280 * 9,
        "model.diffusion_model.output_blocks.8.2.conv.weight": 640 * 640 * 9,
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": 256 * 128,
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": 128 * 256,
        "first_stage_model.decoder.up.3.upsample.conv.weight": 512 * 512 * 9,
        "first_stage_model.decoder.mid.attn_1.q.weight": 512 * 512,
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": 3072 * 768,
    }
    for key, numel in known.items():
        assert expected.get(key) == numel, key


def test_incomplete_sd15_file_is_refused_before_diffusers_sees_it(tmp_path: Path) -> None:
    path = write_header_only(tmp_path / "partial.safetensors", SD15_PROBES)
    with pytest.raises(UnsupportedCheckpointError, match="incomplete checkpoint for sd15"):
        load_pipeline(path)


def test_missing_weight_is_reported_not_left_random(tmp_path: Path) -> None:
    tensors = demo_state_dict(0)
    dropped = "first_stage_model.decoder.up.2.block.1.conv1.weight"
    del tensors[dropped]
    path = tmp_path / "partial-demo.safetensors"
    save_file(tensors, str(path), metadata={"renderfarm_arch": "demo-tiny"})
    with pytest.raises(UnsupportedCheckpointError, match="1 missing") as info:
        load_pipeline(path)
    assert dropped in str(info.value)


# --- loading and rendering -------------------------------------------------------------------


def test_loads_offline_and_weights_round_trip_bit_for_bit(demo_file: Path, no_network: list) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = load_pipeline(demo_file)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert no_network == []
    unet, vae, text_encoder = build_demo_models(0)
    for built, loaded in ((unet, pipe.unet), (vae, pipe.vae), (text_encoder, pipe.text_encoder)):
        expected, actual = built.state_dict(), loaded.state_dict()
        assert expected.keys() == actual.keys()
        differing = [k for k in expected if not torch.equal(expected[k], actual[k])]
        assert differing == [], f"{type(built).__name__}: {differing[:5]}"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, PNDMScheduler)
    config = pipe.scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.skip_prk_steps and config.steps_offset == 1 and not config.set_alpha_to_one
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_loads_in_half_precision(demo_file: Path) -> None:
    pipe = load_pipeline(demo_file, dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16


def test_tiny_render_is_64px_and_deterministic(demo_file: Path, no_network: list) -> None:
    pipe = load_pipeline(demo_file)

    def render(seed: int) -> np.ndarray:
        result = pipe(
            "a photo of a cat",
            negative_prompt="blurry",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        image = result.images[0]
        assert image.size == (64, 64) and image.mode == "RGB"
        return np.asarray(image)

    first, second, other = render(7), render(7), render(8)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)
    assert first.std() > 0  # not a flat (NaN-turned-black) image
    assert no_network == []


def test_no_network_even_without_hf_hub_offline(demo_file: Path) -> None:
    """A fresh interpreter with HF_HUB_OFFLINE unset: the load path itself must stay local."""
    code = (
        "import socket, sys\n"
        "def deny(*a, **k): raise SystemExit(f'network access attempted: {a[1:]}')\n"
        "socket.socket.connect = deny\n"
        "socket.getaddrinfo = deny\n"
        "import torch; torch.set_num_threads(1)\n"
        "from worker.engine import load_pipeline\n"
        f"pipe = load_pipeline({str(demo_file)!r})\n"
        "print('loaded', type(pipe).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded StableDiffusionPipeline" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="full-size SD1.5 (~2 GB, minutes); set RUN_SLOW=1")
def test_full_size_random_sd15_loads_with_bundled_config(tmp_path: Path) -> None:
    out = tmp_path / "random-sd15.safetensors"
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "devtools" / "scripts" / "make_random_sd15.py"), str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout[result.stdout.index("{") :])
        assert report["detected"] == "sd15"
        assert report["weights_checked"] == report["tensors"] == 1130
    finally:
        out.unlink(missing_ok=True)
