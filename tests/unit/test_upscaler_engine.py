"""The upscaler engine on real files: spandrel detection, the weights-only unpickler, the WebUI's tiling and sizes.

Models are the tiny random-weight demo upscalers (devtools/demo_models/upscalers.py), written to tmp_path in
the layouts of published files. Geometry checks use a stand-in "network" that upscales by repeating pixels
(no receptive field), so any tiling must reproduce the untiled image bit for bit where the WebUI's does.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.demo_models.upscalers import (
    DEMO_COMPACT,
    DEMO_COMPACT_PTH,
    DEMO_ESRGAN,
    DEMO_REALESRGAN,
    UPSCALER_DIR,
    build_compact_state,
    write_booby_trapped_pth,
    write_compact,
    write_demo_upscalers,
)
from worker.engine.upscalers import (
    LoadedUpscaler,
    UpscalerRefused,
    load_upscaler,
    upscale_by,
    upscale_pass,
    upscale_to,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    write_demo_upscalers(models)
    return models / UPSCALER_DIR


@pytest.fixture(scope="module")
def esrgan(demo_dir: Path) -> LoadedUpscaler:
    return load_upscaler(demo_dir / DEMO_ESRGAN)


@pytest.fixture(scope="module")
def compact(demo_dir: Path) -> LoadedUpscaler:
    return load_upscaler(demo_dir / DEMO_COMPACT)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: something like a picture, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], axis=-1)
    noisy = base + rng.normal(0, 25, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


class _Calls:
    """Counts the network's forward calls (a forward pre-hook on the module)."""

    def __init__(self, up: LoadedUpscaler) -> None:
        self.count = 0
        self._handle = up.module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def calls_of() -> Iterator:
    made: list[_Calls] = []

    def make(up: LoadedUpscaler) -> _Calls:
        made.append(_Calls(up))
        return made[-1]

    yield make
    for c in made:
        c.close()


class _RepeatPixels:
    """A stand-in descriptor: ``scale``x nearest upscaling, which sees one input pixel per output pixel."""

    def __init__(self, scale: int) -> None:
        self.model = torch.nn.Conv2d(3, 3, 1)  # only for get_param: device and dtype
        self.scale = scale
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)


def repeat_pixels(scale: int = 4, tiling: str = "grid") -> LoadedUpscaler:
    return LoadedUpscaler(model=_RepeatPixels(scale), scale=scale, architecture="test", size_bytes=0,
                          tiling=tiling)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(("name", "arch", "scale"), [
    (DEMO_ESRGAN, "ESRGAN", 4),  # old-arch keys, .safetensors
    (DEMO_REALESRGAN, "ESRGAN", 4),  # {"params_ema": new-arch keys}, .pth
    (DEMO_COMPACT, "Compact", 2),  # SRVGGNetCompact keys, .safetensors
    (DEMO_COMPACT_PTH, "Compact", 2),  # {"params": ...}, .pth
])
def test_demo_files_load_with_architecture_and_scale(demo_dir: Path, name: str, arch: str, scale: int) -> None:
    up = load_upscaler(demo_dir / name)
    assert (up.architecture, up.scale, up.tiling) == (arch, scale, "grid")
    assert up.dtype == torch.float32 and up.device.type == "cpu" and not up.module.training
    assert up.size_bytes == sum(p.numel() * 4 for p in up.module.parameters())
    out = upscale_pass(up, picture(40, 24), 0, 0)
    assert out.size == (40 * scale, 24 * scale) and out.mode == "RGB"


def test_same_weights_in_both_formats_give_the_same_image(demo_dir: Path) -> None:
    image = picture(48, 40)
    for a, b in ((DEMO_ESRGAN, DEMO_REALESRGAN), (DEMO_COMPACT, DEMO_COMPACT_PTH)):
        out_a = upscale_pass(load_upscaler(demo_dir / a), image, 0, 0)
        out_b = upscale_pass(load_upscaler(demo_dir / b), image, 0, 0)
        assert np.array_equal(pixels(out_a), pixels(out_b))


def test_random_weights_give_varied_finite_outputs(esrgan: LoadedUpscaler, compact: LoadedUpscaler) -> None:
    """Not NaN, not saturated to a constant, and dependent on the input."""
    image = picture(64, 64)
    for up in (esrgan, compact):
        with torch.inference_mode():
            raw = up.model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        assert torch.isfinite(raw).all()
        out = pixels(upscale_pass(up, image, 0, 0))
        assert out.std() > 20 and len(np.unique(out)) > 100
        other = pixels(upscale_pass(up, picture(64, 64, seed=1), 0, 0))
        assert np.abs(out - other).mean() > 1


def test_prefer_half_is_ignored_on_the_cpu(demo_dir: Path) -> None:
    assert load_upscaler(demo_dir / DEMO_ESRGAN, "cpu", prefer_half=True).dtype == torch.float32


def test_swinir_and_scunet_folders_tile_like_upscale_2(tmp_path: Path) -> None:
    for folder, tiling in (("SwinIR", "weighted"), ("ScuNET", "weighted"), ("DAT", "grid"), ("ESRGAN", "grid")):
        assert load_upscaler(write_compact(tmp_path / folder / "x.safetensors")).tiling == tiling


# ---------------------------------------------------------------------------------------------- refusals


def test_booby_trapped_pth_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    legacy = tmp_path / "legacy.pth"  # a bare pickle, like tests/unit/test_pickle_refusal.py's
    legacy.write_bytes(pickle.dumps(_Trap(marker), protocol=2))
    assert not marker.exists()
    for path in (write_booby_trapped_pth(tmp_path / "4x-evil.pth", marker), legacy):
        with pytest.raises(UpscalerRefused) as err:
            load_upscaler(path)
        assert path.name in err.value.reason and "never unpickled" in err.value.reason
        assert "weights-only unpickler" in err.value.reason
    assert not marker.exists()


class _Trap:
    """Unpickling this calls Path.touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_the_trap_works_when_unpickled(tmp_path: Path) -> None:
    """The counterpart: an unrestricted load of the same file creates the marker, so its absence means something."""
    marker = tmp_path / "unpickled.marker"
    torch.load(write_booby_trapped_pth(tmp_path / "4x-evil.pth", marker), weights_only=False)
    assert marker.exists()


def test_unknown_architecture_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer_0.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, str(path))
    with pytest.raises(UpscalerRefused) as err:
        load_upscaler(path)
    assert "mystery.safetensors" in err.value.reason and "unsupported architecture" in err.value.reason
    assert "encoder.layer_0.weight" in err.value.reason


def test_grayscale_model_is_refused(tmp_path: Path) -> None:
    from spandrel.architectures.Compact import Compact

    path = tmp_path / "gray.safetensors"
    save_file(Compact(num_in_ch=1, num_out_ch=1, num_feat=4, num_conv=1, upscale=2).state_dict(), str(path))
    with pytest.raises(UpscalerRefused, match="gray.safetensors.*RGB"):
        load_upscaler(path)


@pytest.mark.parametrize(("name", "content"), [
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
    ("garbage.pth", b"PK\x03\x04" + b"\x00" * 200),
    ("empty.pth", b""),
    ("text.pt", b"hello, I am not a model\n"),
])
def test_corrupt_files_are_refused(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UpscalerRefused) as err:
        load_upscaler(path)
    assert name in err.value.reason and "not a readable" in err.value.reason


def test_truncated_and_odd_files_are_refused(tmp_path: Path, demo_dir: Path) -> None:
    for name in (DEMO_REALESRGAN, DEMO_ESRGAN):
        data = (demo_dir / name).read_bytes()
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(UpscalerRefused, match="not a readable"):
            load_upscaler(cut)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(UpscalerRefused, match="not a state dict"):
        load_upscaler(tensor)
    partial = tmp_path / "partial.safetensors"  # detected as Compact, but a layer is missing
    state = build_compact_state()
    save_file({k: v for k, v in state.items() if k != "body.2.weight"}, str(partial))
    with pytest.raises(UpscalerRefused, match="partial.safetensors"):
        load_upscaler(partial)
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(UpscalerRefused, match="unsupported file type"):
        load_upscaler(other)
    with pytest.raises(FileNotFoundError):
        load_upscaler(tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------ one pass


def test_network_sees_bgr_like_the_webui() -> None:
    """upscale_pil_patch feeds pil_image_to_torch_bgr: channel 0 is blue; the output is flipped back."""
    up = repeat_pixels(2)
    image = Image.new("RGB", (4, 4), (255, 128, 0))
    out = upscale_pass(up, image, 0, 0)
    seen = up.model.inputs[0][0, :, 0, 0].tolist()  # type: ignore[attr-defined]
    assert seen == pytest.approx([0.0, 128 / 255, 1.0]) and up.model.inputs[0].dtype == torch.float32
    assert out.getpixel((0, 0)) == (255, 128, 0)


@pytest.mark.parametrize(("size", "tile", "overlap"), [
    ((96, 80), 32, 8), ((97, 75), 32, 8), ((50, 130), 40, 5), ((64, 64), 64, 8), ((33, 70), 16, 0),
    ((6, 30), 16, 8),  # a side no longer than the overlap: one overhanging tile (the WebUI errors here)
])
@pytest.mark.parametrize("tiling", ["grid", "weighted"])
def test_tiling_geometry_is_exact_for_a_pixelwise_network(size: tuple[int, int], tile: int, overlap: int,
                                                           tiling: str) -> None:
    image = picture(*size, seed=3)
    untiled = upscale_pass(repeat_pixels(4, tiling), image, 0, 0)
    assert untiled.size == (size[0] * 4, size[1] * 4)
    assert np.array_equal(pixels(upscale_pass(repeat_pixels(4, tiling), image, tile, overlap)), pixels(untiled))


def test_grid_tile_slightly_larger_than_the_image_blends_black_like_the_webui() -> None:
    """split_grid puts a tile wider than the image at x = w - tile (< 0); combine_grid pastes its first `overlap`
    columns through the ramp mask onto black, so when the tile overhangs by less than the overlap the left
    edge darkens. A WebUI quirk (e.g. a 188 px side with the default 192/8 tiles), kept."""
    image = Image.new("RGB", (60, 40), (200, 200, 200))  # tile 64 > 60 wide by 4 < overlap 8; 40 rows: y = -24
    out = pixels(upscale_pass(repeat_pixels(2), image, 64, 8))
    assert out.shape == (80, 120, 3)
    assert (out[:, 8:] == 200).all()  # the overhang is 4 px (8 px at 2x): only those columns are touched
    left = out[0, :8, 0]
    assert (left < 200).all() and (np.diff(left) >= 0).all()  # ramp values 8..15 of 16, over black


def test_tiles_are_really_used(compact: LoadedUpscaler, calls_of) -> None:
    image = picture(96, 80)
    calls = calls_of(compact)
    upscale_pass(compact, image, 0, 0)
    assert calls.count == 1
    upscale_pass(compact, image, 32, 8)  # columns ceil((96-8)/24) = 4, rows ceil((80-8)/24) = 3
    assert calls.count == 1 + 12
    upscale_pass(compact, image, 192, 8)  # one tile, larger than the image
    assert calls.count == 1 + 12 + 1
    seen: list[tuple[int, int]] = []
    upscale_pass(compact, image, 48, 16, on_tile=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]


def test_tiled_and_untiled_agree(esrgan: LoadedUpscaler, compact: LoadedUpscaler) -> None:
    """96x80 picture, tiles of 32 overlapping by 8 (12 tiles) vs one call, in 0..255.

    Measured (torch 2.14.1, CPU, fp32): ESRGAN demo 4x max 25, mean 0.446; Compact demo 2x max 2, mean 0.021.
    Bounds: ESRGAN max <= 40, mean <= 1.0; Compact max <= 4, mean <= 0.1. The differences are real: a tile's
    edge pixels see zero padding instead of their neighbours (ESRGAN's receptive field is ~20 input px),
    and the grid's linear blend over 8 px only softens the seam. Real ESRGAN weights do the same in the WebUI.
    """
    image = picture(96, 80)
    for up, max_bound, mean_bound in ((esrgan, 40, 1.0), (compact, 4, 0.1)):
        untiled = pixels(upscale_pass(up, image, 0, 0))
        tiled = pixels(upscale_pass(up, image, 32, 8))
        diff = np.abs(untiled - tiled)
        assert diff.max() <= max_bound and diff.mean() <= mean_bound, (up.architecture, diff.max(), diff.mean())
        assert diff.max() > 0  # tiles did change something: they were real tiles


def test_overlap_must_be_smaller_than_the_tile(compact: LoadedUpscaler) -> None:
    with pytest.raises(ValueError, match="tile_overlap"):
        upscale_pass(compact, picture(40, 40), 16, 16)


# -------------------------------------------------------------------------------------------- sizes


def test_upscale_by_two_with_a_4x_model(esrgan: LoadedUpscaler, calls_of) -> None:
    calls = calls_of(esrgan)
    out = upscale_by(esrgan, picture(64, 48), 2, 0, 0)
    assert out.size == (128, 96) and calls.count == 1


def test_upscale_by_floors_the_target_to_a_multiple_of_8(esrgan: LoadedUpscaler) -> None:
    """Upscaler.upscale: dest_w = int((w * scale) // 8 * 8); the WebUI's extras "scale by" shows it."""
    assert upscale_by(esrgan, picture(64, 48), 2.5, 0, 0).size == (160, 120)
    assert upscale_by(esrgan, picture(60, 44), 2.5, 0, 0).size == (144, 104)  # not (150, 110)
    assert upscale_by(esrgan, picture(37, 29), 1.7, 32, 8).size == (56, 48)


def test_upscale_by_repeats_passes_up_to_three(compact: LoadedUpscaler, calls_of) -> None:
    calls = calls_of(compact)
    assert upscale_by(compact, picture(24, 16), 4, 0, 0).size == (96, 64) and calls.count == 2
    assert upscale_by(compact, picture(24, 16), 3, 0, 0).size == (72, 48) and calls.count == 2 + 2
    assert upscale_by(compact, picture(8, 8), 16, 0, 0).size == (128, 128) and calls.count == 4 + 3  # capped


def test_upscale_by_one_still_runs_a_pass_and_below_one_runs_none(esrgan: LoadedUpscaler, calls_of) -> None:
    calls = calls_of(esrgan)
    assert upscale_by(esrgan, picture(36, 20), 1, 0, 0).size == (32, 16) and calls.count == 1
    assert upscale_by(esrgan, picture(40, 24), 0.5, 0, 0).size == (16, 8) and calls.count == 1


def test_upscale_to_the_hires_target(esrgan: LoadedUpscaler, calls_of) -> None:
    calls = calls_of(esrgan)
    assert upscale_to(esrgan, picture(64, 48), 128, 96, 0, 0).size == (128, 96) and calls.count == 1
    assert upscale_to(esrgan, picture(60, 44), 150, 110, 32, 8).size == (150, 110)  # 144x104 then LANCZOS
    assert upscale_to(esrgan, picture(64, 48), 100, 50, 0, 0).size == (100, 50)  # scale = max(1.5625, 1.04)
    before = calls.count
    assert upscale_to(esrgan, picture(64, 48), 64, 40, 0, 0).size == (64, 40)  # scale 1: LANCZOS only
    assert upscale_to(esrgan, picture(64, 48).convert("L"), 128, 96, 0, 0).mode == "L"  # L: LANCZOS only
    assert calls.count == before


def test_upscale_to_is_upscale_by_then_resize(esrgan: LoadedUpscaler) -> None:
    image = picture(60, 44)
    expected = upscale_by(esrgan, image, 2.5, 0, 0).resize((150, 110), Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(upscale_to(esrgan, image, 150, 110, 0, 0)), pixels(expected))


def test_rgba_input_comes_back_rgb(compact: LoadedUpscaler) -> None:
    image = picture(20, 20).convert("RGBA")
    assert upscale_pass(compact, image, 0, 0).mode == "RGB"
    assert upscale_pass(compact, image, 16, 4).mode == "RGB"


def test_pixel_repeating_stand_in_is_nearest_upscaling() -> None:
    """What the geometry tests rely on, checked against torch's own nearest interpolation."""
    x = torch.rand(1, 3, 5, 7)
    assert torch.equal(_RepeatPixels(3)(x), torch.nn.functional.interpolate(x, scale_factor=3, mode="nearest"))
