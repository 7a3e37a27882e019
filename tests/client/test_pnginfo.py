"""renderfarm_client/pnginfo.py: a PNG's text chunks, read without Pillow."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from renderfarm_client.pnginfo import NotAPng, read_png_text

pytestmark = pytest.mark.unit

INFOTEXT = "a lighthouse, (masterpiece:1.2)\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, Seed: 7"


def test_reads_text_ztxt_and_itxt_chunks(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("parameters", INFOTEXT)
    info.add_text("comment", "x" * 2000, zip=True)  # zTXt
    info.add_itxt("title", "등대", lang="ko", tkey="lighthouse")
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_png_text(path) == {"parameters": INFOTEXT, "comment": "x" * 2000, "title": "등대"}


def test_not_a_png_and_a_cut_png_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(NotAPng, match="not a PNG"):
        read_png_text(tmp_path / "a.txt")
    info = PngInfo()
    info.add_text("parameters", INFOTEXT)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png", pnginfo=info)
    data = (tmp_path / "b.png").read_bytes()
    cut = data[: data.index(b"parameters") + 5]
    (tmp_path / "cut.png").write_bytes(cut)
    with pytest.raises(NotAPng, match="cut short"):
        read_png_text(tmp_path / "cut.png")
