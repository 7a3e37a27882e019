"""ControlNet weight-free preprocessors and detected-map fitting, checked against the extension's formulas.

Golden maps live in tests/unit/data/controlnet/; regenerate them (after a deliberate change) with
``CONTROLNET_GOLDEN_REGEN=1 .venv/bin/python -m pytest tests/unit/test_controlnet_preprocessors.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.controlnet.detectmap import (
    ResizeMode,
    hint_array,
    hwc3,
    parse_resize_mode,
    prepare_detected_map,
)
from shared.controlnet.preprocessors import (
    IMPLEMENTATIONS,
    PREPROCESSORS,
    PreprocessorUnavailable,
    module_list,
    pad64,
    pixel_perfect_resolution,
    resize_image_with_pad,
    resolve_module,
    resolve_params,
    run_preprocessor,
)

DATA = Path(__file__).parent / "data" / "controlnet"


def white_square(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def synthetic(h: int = 64, w: int = 64) -> np.ndarray:
    """Deterministic test card: colour gradients, a dark disc and a bright bar."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], axis=2)
    img = img.astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), h // 5, (20, 30, 40), -1)
    cv2.rectangle(img, (w // 2, h // 6), (w - 6, h // 6 + 6), (250, 240, 230), -1)
    return img


# --- registry -----------------------------------------------------------------------------------------------------


def test_aliases_resolve_to_internal_names() -> None:
    assert resolve_module("depth_midas").name == "depth"
    assert resolve_module("depth").label == "depth_midas"
    assert resolve_module("invert (from white bg & black line)").name == "invert"
    assert resolve_module("t2ia_color_grid").name == "color"
    assert resolve_module("lineart_standard (from white bg & black line)").name == "lineart_standard"
    assert resolve_module("softedge_pidinet").name == "pidinet"


def test_unknown_and_case_sensitive_lookup() -> None:
    with pytest.raises(KeyError):
        resolve_module("no_such_module")
    with pytest.raises(KeyError):
        resolve_module("Canny")  # the extension matches names exactly
    with pytest.raises(KeyError):
        run_preprocessor("nope", white_square())


def test_weighted_and_non_map_modules_are_unavailable() -> None:
    with pytest.raises(PreprocessorUnavailable) as err:
        run_preprocessor("depth_midas", white_square())
    assert err.value.name == "depth" and "midas/dpt_hybrid-midas-501f0c75.pt" in err.value.reason
    with pytest.raises(PreprocessorUnavailable):
        run_preprocessor("openpose", white_square())
    with pytest.raises(PreprocessorUnavailable):
        run_preprocessor("reference_only", white_square())
    assert PREPROCESSORS["reference_only"].needs_weights is False
    assert PREPROCESSORS["reference_only"].runnable is False


def test_every_runnable_weight_free_module_is_implemented() -> None:
    runnable = {p.name for p in PREPROCESSORS.values() if p.runnable and not p.needs_weights}
    assert runnable - {"shuffle"} == set(IMPLEMENTATIONS)


def test_slider_definitions_match_the_extension() -> None:
    canny = PREPROCESSORS["canny"]
    assert canny.processor_res is not None and (canny.processor_res.default, canny.processor_res.minimum,
                                                 canny.processor_res.maximum) == (512, 64, 2048)
    assert canny.threshold_a is not None and canny.threshold_a.label == "Low Threshold"
    assert (canny.threshold_a.default, canny.threshold_a.minimum, canny.threshold_a.maximum) == (100, 1, 255)
    assert canny.threshold_b is not None and canny.threshold_b.default == 200
    assert PREPROCESSORS["invert"].processor_res is None
    blur = PREPROCESSORS["blur_gaussian"].threshold_a
    assert blur is not None and (blur.label, blur.default, blur.minimum, blur.maximum) == ("Sigma", 9.0, 0.01, 64.0)
    tile = PREPROCESSORS["tile_resample"].threshold_a
    assert tile is not None and (tile.default, tile.minimum, tile.maximum) == (1.0, 1.0, 8.0)


def test_module_list_order_and_binary_unlisted() -> None:
    names = module_list()
    assert names[0] == "none"
    assert "binary" not in names and "depth" in names
    labels = module_list(alias_names=True)
    assert "depth_midas" in labels and "depth" not in labels
    assert labels[1] == "ip-adapter-auto"  # priority 1000 sorts first after none


def test_defaults_applied_for_minus_one_and_out_of_range() -> None:
    canny = PREPROCESSORS["canny"]
    assert resolve_params(canny) == (512, 100, 200)
    assert resolve_params(canny, 300, 5000, 50) == (300, 100, 50)
    img = synthetic()
    assert np.array_equal(run_preprocessor("canny", img), run_preprocessor("canny", img, 512, 100, 200))
    assert run_preprocessor("canny", img).shape == (512, 512, 3)


# --- helpers ------------------------------------------------------------------------------------------------------


def test_hwc3() -> None:
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(hwc3(grey), np.stack([grey] * 3, axis=2))
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (100, 0, 0, 0)  # fully transparent -> white
    rgba[0, 1] = (100, 50, 0, 255)  # opaque -> colour
    assert hwc3(rgba).tolist() == [[[255, 255, 255], [100, 50, 0]]]


def test_resize_image_with_pad() -> None:
    assert (pad64(64), pad64(65), pad64(100)) == (0, 63, 28)
    img = synthetic(50, 100)
    padded, remove_pad = resize_image_with_pad(img, 100)  # k = 2: 100x200 -> pad to 128x256
    assert padded.shape == (128, 256, 3)
    assert np.array_equal(padded[100:], np.repeat(padded[99:100], 28, axis=0))  # edge padding
    assert remove_pad(padded).shape == (100, 200, 3)


def test_pixel_perfect_resolution() -> None:
    # raw 512x768 (h x w) -> target 1024x1024: k = (2, 4/3); crop uses max -> 2 * 512; fill uses min -> 4/3 * 512
    assert pixel_perfect_resolution((512, 768), 1024, 1024, ResizeMode.CROP_AND_RESIZE) == 1024
    assert pixel_perfect_resolution((512, 768), 1024, 1024, "Resize and Fill") == 683
    assert pixel_perfect_resolution((512, 768), 1024, 1024, 0) == 1024
    assert pixel_perfect_resolution((300, 200), 512, 768, ResizeMode.RESIZE_AND_FILL) == 512  # min(2.56, 2.56)*200


# --- implementations ----------------------------------------------------------------------------------------------


def test_invert() -> None:
    img = np.array([[[0, 10, 255], [128, 1, 254]]], dtype=np.uint8)
    assert run_preprocessor("invert (from white bg & black line)", img).tolist() == [[[255, 245, 0], [127, 254, 1]]]


def test_none_is_identity() -> None:
    img = synthetic()
    assert np.array_equal(run_preprocessor("none", img), img)


def test_canny_edges_only_on_square_border() -> None:
    img = white_square()
    out = run_preprocessor("canny", img, processor_res=64)
    assert out.shape == (64, 64, 3)
    edge = out[:, :, 0] > 0
    assert np.array_equal(out[:, :, 0], out[:, :, 2])
    ring = np.zeros((64, 64), dtype=bool)
    ring[15:49, 15:49] = True
    ring[17:47, 17:47] = False  # a 2-pixel band straddling the square's boundary
    assert edge.any() and not (edge & ~ring).any()
    for line in (edge[16:48, 15:17], edge[16:48, 47:49], edge[15:17, 16:48], edge[47:49, 16:48]):
        assert line.any(axis=1 if line.shape[1] == 2 else 0).all()  # every side is traced


def test_threshold_and_binary() -> None:
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:, :32] = 100
    img[:, 32:] = 200
    img[0, 0] = (250, 250, 90)  # min channel decides for "threshold"
    out = run_preprocessor("threshold", img, processor_res=64, threshold_a=150)
    assert out[0, 0].tolist() == [0, 0, 0] and (out[1:, :32] == 0).all() and (out[:, 32:] == 255).all()
    # binary: grey > t -> 0 (inverted), grey <= t -> 255; threshold 0 means Otsu
    b = run_preprocessor("binary", img[1:, :], processor_res=64, threshold_a=150)
    assert b.shape == (64, 64, 3) and (b[:, :30] == 255).all() and (b[:, 34:] == 0).all()
    otsu = run_preprocessor("binary", img[1:, :], processor_res=64, threshold_a=0)
    assert np.array_equal(otsu, b)
    assert np.array_equal(run_preprocessor("binary", img[1:, :], processor_res=64, threshold_a=220), 255 + 0 * b)


def test_blur_gaussian_matches_cv2() -> None:
    img = synthetic()
    out = run_preprocessor("blur_gaussian", img, processor_res=64, threshold_a=3.5)
    assert np.array_equal(out, cv2.GaussianBlur(img, (0, 0), 3.5))
    default = run_preprocessor("blur_gaussian", img, processor_res=64)
    assert np.array_equal(default, cv2.GaussianBlur(img, (0, 0), 9.0))


def test_tile_resample_size() -> None:
    img = synthetic(60, 90)
    assert run_preprocessor("tile_resample", img).shape == (60, 90, 3)  # rate 1.0 < 1.1: unchanged
    assert np.array_equal(run_preprocessor("tile_resample", img, threshold_a=1.05), img)
    assert run_preprocessor("tile_resample", img, threshold_a=2.5).shape == (24, 36, 3)  # int(60/2.5), int(90/2.5)


def test_color_grid_blocks() -> None:
    img = synthetic(128, 192)
    out = run_preprocessor("t2ia_color_grid", img, processor_res=128)
    assert out.shape == (128, 192, 3)  # shortest edge -> 128; grid 2x3 cells of 64x64
    for by in range(2):
        for bx in range(3):
            block = out[by * 64 : (by + 1) * 64, bx * 64 : (bx + 1) * 64]
            assert (block == block[0, 0]).all()
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 1


def test_scribble_xdog_and_lineart_standard_are_binary_or_grey() -> None:
    img = synthetic()
    xdog = run_preprocessor("scribble_xdog", img, processor_res=64)
    assert set(np.unique(xdog).tolist()) <= {0, 255}
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert (run_preprocessor("lineart_standard", blank, processor_res=64) == 0).all()


def test_shuffle_is_seeded() -> None:
    img = synthetic()
    a = run_preprocessor("shuffle", img, seed=7)
    assert a.shape == (512, 512, 3)  # hidden resolution slider (0..1, value 512): any real res becomes 512
    assert np.array_equal(a, run_preprocessor("shuffle", img, 256, seed=7))
    assert not np.array_equal(a, run_preprocessor("shuffle", img, seed=8))


# --- detected map -------------------------------------------------------------------------------------------------


def test_parse_resize_mode() -> None:
    assert parse_resize_mode("Just Resize") is ResizeMode.JUST_RESIZE
    assert parse_resize_mode("Inner Fit (Scale to Fit)") is ResizeMode.CROP_AND_RESIZE
    assert parse_resize_mode("Envelope (Outer Fit)") is ResizeMode.RESIZE_AND_FILL
    assert [parse_resize_mode(i) for i in (0, 1, 2, 3)] == [
        ResizeMode.JUST_RESIZE, ResizeMode.CROP_AND_RESIZE, ResizeMode.RESIZE_AND_FILL, ResizeMode.JUST_RESIZE]
    for bad in ("just resize", 4, -1, "Fill"):
        with pytest.raises(ValueError, match="Crop and Resize"):
            parse_resize_mode(bad)


def test_just_resize_size() -> None:
    out = prepare_detected_map(synthetic(64, 32), 80, 48, ResizeMode.JUST_RESIZE)
    assert out.shape == (48, 80, 3) and out.dtype == np.uint8


def test_crop_and_resize_centre_crop() -> None:
    src = np.zeros((40, 80, 3), dtype=np.uint8)
    src[:, 20:60] = (10, 20, 30)
    src[:, :20] = (200, 0, 0)
    src[:, 60:] = (0, 0, 200)  # three colours -> INTER_NEAREST
    out = prepare_detected_map(src, 40, 40, "Crop and Resize")  # k = 1: crop the middle 40 columns
    assert out.shape == (40, 40, 3)
    assert (out == (10, 20, 30)).all()


def test_resize_and_fill_pads_with_border_median() -> None:
    src = np.zeros((20, 40, 3), dtype=np.uint8)
    src[:] = (90, 80, 70)
    src[0, :3] = (1, 2, 3)
    src[8:12, 18:22] = (250, 250, 250)
    out = prepare_detected_map(src, 40, 60, ResizeMode.RESIZE_AND_FILL)  # k = min(3, 1) = 1: 20 rows at 20..40
    assert out.shape == (60, 40, 3)
    assert (out[:20] == (90, 80, 70)).all() and (out[40:] == (90, 80, 70)).all()
    assert np.array_equal(out[20:40], src)


def test_binary_map_stays_binary_after_resize() -> None:
    blob = white_square(64, 16, 48)
    for mode in ResizeMode:
        out = prepare_detected_map(blob, 200, 150, mode)
        assert set(np.unique(out).tolist()) == {0, 255}
    edges = run_preprocessor("canny", white_square(), processor_res=64)
    up = prepare_detected_map(edges, 128, 128, ResizeMode.JUST_RESIZE)  # one-pixel edges: nms + thinning
    assert set(np.unique(up).tolist()) == {0, 255}
    assert (up[64, 64] == 0).all() and (up[0, 0] == 0).all()


def test_hint_array() -> None:
    m = np.array([[[0, 255, 51]]], dtype=np.uint8)
    h = hint_array(m)
    assert h.dtype == np.float32 and h.shape == (1, 1, 3)
    assert np.array_equal(h, np.array([[[0.0, 1.0, 0.2]]], dtype=np.float32))


# --- golden regression --------------------------------------------------------------------------------------------

GOLDEN_CASES: dict[str, dict[str, float]] = {
    "canny": {"processor_res": 64},
    "invert": {},
    "threshold": {"processor_res": 64},
    "binary": {"processor_res": 64, "threshold_a": 120},
    "scribble_xdog": {"processor_res": 64, "threshold_a": 16},
    "lineart_standard": {"processor_res": 64},
    "tile_resample": {"threshold_a": 2.0},
    "blur_gaussian": {"processor_res": 64, "threshold_a": 2.0},
    "color": {"processor_res": 128},
    "recolor_luminance": {"threshold_a": 1.5},
    "recolor_intensity": {"threshold_a": 0.5},
}


def _golden_input() -> np.ndarray:
    return synthetic(48, 64)


@pytest.mark.parametrize("module", sorted(GOLDEN_CASES))
def test_golden_outputs(module: str) -> None:
    out = run_preprocessor(module, _golden_input(), **GOLDEN_CASES[module])
    path = DATA / f"{module}.png"
    if os.environ.get("CONTROLNET_GOLDEN_REGEN"):
        DATA.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(path, optimize=True)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert out.shape == expected.shape and np.array_equal(out, expected)


def test_golden_detected_maps() -> None:
    src = run_preprocessor("canny", _golden_input(), processor_res=64)
    outs = [prepare_detected_map(src, 80, 56, mode) for mode in ResizeMode]
    path = DATA / "detectmap_canny_80x56.png"
    joined = np.concatenate(outs, axis=0)
    if os.environ.get("CONTROLNET_GOLDEN_REGEN"):
        Image.fromarray(joined).save(path, optimize=True)
    assert np.array_equal(joined, np.asarray(Image.open(path).convert("RGB")))
