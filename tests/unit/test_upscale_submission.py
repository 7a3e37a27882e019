"""Upscale jobs at the gateway: sizes as the WebUI's Extras gives them, and inputs checked before decoding."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from api.submission.upscale import extras_output_size, plan_upscale, stage_upscale_inputs
from shared.errors import FieldError
from shared.jobs.contract import UpscaleSpec
from shared.jobs.schemas import UpscaleRequest
from shared.settings import LimitSettings, ModelSettings, Settings
from shared.storage.local import LocalObjectStore


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "gray").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("fields", "size", "expected"), [
    ({"upscaler_1": "Lanczos", "upscaling_resize": 1.5}, (60, 44), (88, 64)),  # 90x66 floored to 8
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 60}, (60, 44),
     (100, 60)),  # cropped to exactly the asked size
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 60,
      "upscaling_crop": False}, (60, 44), (96, 72)),  # covers 100x60: 60 * (100 / 60) = 100 -> 96, 44 * 1.67 -> 72
    ({"upscaler_1": "None"}, (60, 44), (60, 44)),
])
def test_output_sizes_follow_the_webui(fields: dict, size: tuple[int, int], expected: tuple[int, int]) -> None:
    spec = UpscaleSpec(images=("k",), **fields)
    assert extras_output_size(spec, *size) == expected


def test_an_oversize_output_is_refused_from_the_header_before_any_pixel_is_decoded(tmp_path: Path) -> None:
    """A PNG whose header says 3000x3000 but whose pixel data is cut off: the size check answers first."""
    data = png(3000, 3000)
    truncated = data[: len(data) // 3]
    settings = Settings(models=ModelSettings(models_dir=tmp_path), limits=LimitSettings(max_upscale_pixels=8192**2))
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"secret")
    body = UpscaleRequest(mode="upscale", image=base64.b64encode(truncated).decode(), upscaler_1="Lanczos",
                          upscaling_resize=4)
    with pytest.raises(FieldError, match="over the limit") as info:
        stage_upscale_inputs(plan_upscale(body, settings), owner="o", store=store, settings=settings)
    assert info.value.field == ("body", "image")
    small = body.model_copy(update={"upscaling_resize": 2})
    with pytest.raises(FieldError, match="corrupt image data"):  # within the limit: now it is decoded, and fails
        stage_upscale_inputs(plan_upscale(small, settings), owner="o", store=store, settings=settings)
