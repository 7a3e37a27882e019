"""Fit a ControlNet detected map to the generation size, as the A1111 ControlNet extension does.

Reference: Mikubill/sd-webui-controlnet at commit 56cec5b (v1.1.455, July 2024).

* ``scripts/enums.py`` ``ResizeMode``: the three modes "Just Resize" (0), "Crop and Resize" (1, the default of a
  unit, internally ``INNER_FIT``) and "Resize and Fill" (2, ``OUTER_FIT``).
* ``internal_controlnet/external_code.py`` ``resize_mode_aliases`` / ``resize_mode_from_value``: the old UI names
  and the int codes (3, the retired "Just Resize (Latent upscale)", also maps to "Just Resize").
* ``scripts/controlnet.py`` ``Script.detectmap_proc`` with its inner ``high_quality_resize`` ("Written by lvmin"):
  binary maps (exactly two colours, dark < 16 and bright > 240) are resized, averaged to grey and re-binarised with
  Otsu; when most of their white pixels are one-pixel edges the result is also non-maximum suppressed and thinned
  (``scripts/lvminthin.py`` ``nake_nms`` / ``lvmin_thin``). Maps with 3..199 colours (segmentation maps) use nearest
  neighbour; others INTER_AREA when shrinking and INTER_CUBIC when enlarging.
  "Resize and Fill" scales to fit inside and pads with the per-channel median of the four borders; "Crop and Resize"
  scales to cover and centre-crops.
* ``get_pytorch_control``: the conditioning tensor is the map as float in [0, 1] (``hint_array`` here, HWC).

The extension's inpaint path (float maps with an alpha mask channel) is not reproduced: maps here are uint8 RGB.
This module is torch-free (numpy + OpenCV).
"""

from __future__ import annotations

from enum import StrEnum

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = [
    "RESIZE_MODE_ALIASES",
    "ResizeMode",
    "hint_array",
    "high_quality_resize",
    "hwc3",
    "lvmin_thin",
    "nake_nms",
    "parse_resize_mode",
    "prepare_detected_map",
]

U8 = npt.NDArray[np.uint8]


class ResizeMode(StrEnum):
    """The extension's ``scripts/enums.py`` ``ResizeMode``; values are its canonical UI/API strings."""

    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"  # the extension's INNER_FIT
    RESIZE_AND_FILL = "Resize and Fill"  # the extension's OUTER_FIT

    def int_value(self) -> int:
        return _MODE_ORDER.index(self)


_MODE_ORDER: tuple[ResizeMode, ...] = (
    ResizeMode.JUST_RESIZE,
    ResizeMode.CROP_AND_RESIZE,
    ResizeMode.RESIZE_AND_FILL,
)

#: Old names accepted by the extension (``external_code.resize_mode_aliases`` and ``ControlNetUnit``'s validator).
RESIZE_MODE_ALIASES: dict[str, ResizeMode] = {
    "Inner Fit (Scale to Fit)": ResizeMode.CROP_AND_RESIZE,
    "Outer Fit (Shrink to Fit)": ResizeMode.RESIZE_AND_FILL,
    "Scale to Fit (Inner Fit)": ResizeMode.CROP_AND_RESIZE,
    "Envelope (Outer Fit)": ResizeMode.RESIZE_AND_FILL,
}

#: ``resize_mode_from_value``: 0/1/2 index the enum; 3 was "Just Resize (Latent upscale)" and maps to Just Resize.
_INT_MODES: dict[int, ResizeMode] = {0: _MODE_ORDER[0], 1: _MODE_ORDER[1], 2: _MODE_ORDER[2], 3: _MODE_ORDER[0]}


def parse_resize_mode(value: str | int | ResizeMode) -> ResizeMode:
    """Parse a resize mode as the extension accepts it (canonical string, old alias, or int 0..3).

    Matching is exact (case-sensitive), as in the extension. Unlike the extension, which logs a warning and falls
    back to "Just Resize" for ints >= 4, anything else raises ``ValueError`` listing the allowed values.
    """
    if isinstance(value, ResizeMode):
        return value
    if isinstance(value, str):
        for mode in ResizeMode:
            if value == mode.value:
                return mode
        if value in RESIZE_MODE_ALIASES:
            return RESIZE_MODE_ALIASES[value]
    elif isinstance(value, int) and not isinstance(value, bool) and value in _INT_MODES:
        return _INT_MODES[value]
    allowed = [m.value for m in ResizeMode] + list(RESIZE_MODE_ALIASES) + [str(i) for i in _INT_MODES]
    raise ValueError(f"unknown resize mode {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def hwc3(x: np.ndarray) -> U8:
    """``annotator/util.py`` ``HWC3``: uint8 grey/RGB/RGBA -> RGB (alpha composited over white)."""
    if x.dtype != np.uint8:
        raise TypeError(f"HWC3 needs a uint8 image, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"HWC3 needs HxW, HxWx1, HxWx3 or HxWx4, got shape {x.shape}")
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    blended = color * alpha + 255.0 * (1.0 - alpha)
    return blended.clip(0, 255).astype(np.uint8)


def rgb_array(image: Image.Image) -> U8:
    """An image as the extension reads an input: transparency composited over white (``HWC3``), else RGB."""
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return hwc3(np.asarray(image.convert("RGBA" if alpha else "RGB"), dtype=np.uint8))


# --- scripts/lvminthin.py ----------------------------------------------------------------------------------------

_THIN_BASE = (
    np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
    np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32),
)
_PRUNE_BASE = (
    np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
    np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32),
)


def _rotations(base: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    # Order matters: all base kernels at 0 degrees, then all at 90, 180, 270 (as lvminthin builds its lists).
    return [np.rot90(k, k=turns, axes=(0, 1)) for turns in range(4) for k in base]


_THIN_KERNELS = _rotations(_THIN_BASE)
_PRUNE_KERNELS = _rotations(_PRUNE_BASE)


def _thin_pass(x: U8, kernels: list[np.ndarray]) -> tuple[U8, bool]:
    """One pass of hit-or-miss removals (in place); returns (image, nothing_removed)."""
    done = True
    for kernel in kernels:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127)
        x[hits] = 0
        if hits[0].shape[0] > 0:
            done = False
    return x, done


def lvmin_thin(x: U8, prunings: bool = True) -> U8:
    """Thin a binary single-channel map to one-pixel lines (at most 32 passes), optionally pruning spurs."""
    y = x
    for _ in range(32):
        y, done = _thin_pass(y, _THIN_KERNELS)
        if done:
            break
    if prunings:
        y, _ = _thin_pass(y, _PRUNE_KERNELS)
    return y


_NMS_KERNELS = (
    np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
    np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
    np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
    np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
)


def nake_nms(x: U8) -> U8:
    """Keep a pixel where it is the maximum along any of the four line directions (no blur, no threshold)."""
    y = np.zeros_like(x)
    for kernel in _NMS_KERNELS:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    return y


# --- scripts/controlnet.py detectmap_proc -------------------------------------------------------------------------


def _unique_colour_count(x: U8) -> int:
    """``scripts/utils.py`` ``get_unique_axis0`` length: number of distinct pixel values. Each pixel's channels are
    packed into one integer first (``np.unique`` over rows is ~100x slower on a 512x512 map)."""
    flat = x.reshape(-1, x.shape[2]).astype(np.uint64)
    packed = np.zeros(flat.shape[0], dtype=np.uint64)
    for channel in range(flat.shape[1]):
        packed = (packed << np.uint64(8)) | flat[:, channel]
    return int(np.unique(packed).shape[0])


def high_quality_resize(x: U8, size: tuple[int, int]) -> U8:
    """Resize an HxWx3 uint8 map to ``size`` = (width, height) the way ``high_quality_resize`` does."""
    width, height = size
    if x.shape[0] == height and x.shape[1] == width:
        return x
    new_area = width * height
    old_area = x.shape[0] * x.shape[1]
    new_size_is_smaller = new_area < old_area
    new_size_is_bigger = new_area > old_area
    unique_colours = _unique_colour_count(x)

    is_binary = False
    is_one_pixel_edge = False
    if unique_colours == 2:
        is_binary = bool(np.min(x) < 16 and np.max(x) > 240)
        if is_binary:
            ones = np.ones(shape=(3, 3), dtype=np.uint8)
            opened = cv2.dilate(cv2.erode(x, ones, iterations=1), ones, iterations=1)
            one_pixel_edge_count = int(np.count_nonzero(opened < x))
            all_edge_count = int(np.count_nonzero(x > 127))
            is_one_pixel_edge = one_pixel_edge_count * 2 > all_edge_count

    if 2 < unique_colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif new_size_is_smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC

    y: U8 = np.asarray(cv2.resize(x, (width, height), interpolation=interpolation), dtype=np.uint8)
    if is_binary:
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if is_one_pixel_edge:
            grey = nake_nms(grey)
            _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            grey = lvmin_thin(np.asarray(grey, dtype=np.uint8), prunings=new_size_is_bigger)
        else:
            _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([np.asarray(grey, dtype=np.uint8)] * 3, axis=2)
    return y


def _safe_int(v: float) -> int:
    return int(np.round(v))


def border_median_colour(detected: U8) -> U8:
    """Per-channel median of the top, bottom, left and right edge pixels (corners counted twice, as upstream)."""
    borders = np.concatenate([detected[0, :, :], detected[-1, :, :], detected[:, 0, :], detected[:, -1, :]], axis=0)
    return np.median(borders, axis=0).astype(detected.dtype)


def prepare_detected_map(detected: np.ndarray, width: int, height: int, mode: ResizeMode | str | int) -> U8:
    """Fit a detected map to (height, width) as ``detectmap_proc`` does; returns a contiguous uint8 HxWx3 copy."""
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    resize_mode = parse_resize_mode(mode)
    x = hwc3(np.asarray(detected))

    if resize_mode is ResizeMode.JUST_RESIZE:
        return np.ascontiguousarray(high_quality_resize(x, (width, height)).copy())

    old_h, old_w = float(x.shape[0]), float(x.shape[1])
    k_h = float(height) / old_h
    k_w = float(width) / old_w

    if resize_mode is ResizeMode.RESIZE_AND_FILL:
        k = min(k_h, k_w)
        background = np.tile(border_median_colour(x)[None, None], [height, width, 1])
        fitted = high_quality_resize(x, (_safe_int(old_w * k), _safe_int(old_h * k)))
        new_h, new_w = fitted.shape[:2]
        pad_h = max(0, (height - new_h) // 2)
        pad_w = max(0, (width - new_w) // 2)
        background[pad_h : pad_h + new_h, pad_w : pad_w + new_w] = fitted
        return np.ascontiguousarray(background.copy())

    k = max(k_h, k_w)
    covered = high_quality_resize(x, (_safe_int(old_w * k), _safe_int(old_h * k)))
    new_h, new_w = covered.shape[:2]
    pad_h = max(0, (new_h - height) // 2)
    pad_w = max(0, (new_w - width) // 2)
    return np.ascontiguousarray(covered[pad_h : pad_h + height, pad_w : pad_w + width].copy())


def hint_array(detected_map: np.ndarray) -> npt.NDArray[np.float32]:
    """The conditioning image: ``get_pytorch_control`` (``x.float() / 255``) kept as float32 HxWx3 in [0, 1]."""
    x = hwc3(np.asarray(detected_map))
    return np.ascontiguousarray(x.astype(np.float32) / np.float32(255.0))
