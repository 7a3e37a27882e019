"""Prompt styles: the WebUI's styles.csv format, merge rule, shipped presets and user file."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

import pytest

import shared.webui.styles
from shared.errors import FieldError
from shared.settings import ModelSettings, Settings
from shared.webui.styles import BUILTIN_STYLES_FILE, StyleBook, load_style_book, merge_prompts, read_styles_csv

# The presets from our users' notes (../shared/webui-reference.md), verbatim.
PORTRAIT = ("(portrait:1.3),(best quality),(masterpiece),(high resolution),illustration,perfect_anatomy,"
            "perfect_finger,hyper detail,high quality, super detail,(finely detailed beautiful eyes and detailed "
            "face),ultra detailed cloths,solo")
PORTRAIT_NEGATIVE = (
    "(nsfw:2), lowres, ((bad anatomy)), ((bad hands)), text, missing finger, extra digits, fewer digits, blurry, "
    "((mutated hands and fingers)), (poorly drawn face), ((mutation)), ((deformed face)), (ugly), "
    "((bad proportions)), ((extra limbs)), extra face, (double head), (extra head), ((extra feet)), monster, logo, "
    "cropped, worst quality, low quality, normal quality, jpeg, humpbacked, long body, long neck, "
    "((jpeg artifacts)),"
)
WALLPAPER = ("{extremely detailed CG unity 8k wallpaper}, {{{only background}}}, {{masterpiece}}, {{{best quality}}}, "
             "{{ultra-detailed}}, {best illustration}, {best shadow}, {{an extremely delicate and beautiful}}, "
             "{{{dynamic angle}}}, {{{glow white particles}}}, {{cinematic light}}, high resolution illustration, "
             "(high resolution), Incredibly detail, high quality, intricate details, hyper detailsuper detail,")
WALLPAPER_NEGATIVE = ("human, man, men, woman, 1girl, 2girls, 3girls, 4girls, 5girls, multiple girls, 1boy, 2boys, "
                      "3boys, 4boys, 5boys, multiple boys,")


def test_doctests() -> None:
    assert doctest.testmod(shared.webui.styles).failed == 0


@pytest.mark.parametrize(("style", "prompt", "merged"), [
    ("{prompt}, masterpiece", "a cat", "a cat, masterpiece"),
    ("best quality, {prompt}, {prompt}", "a cat", "best quality, a cat, a cat"),
    ("masterpiece", "a cat ", "a cat, masterpiece"),
    ("masterpiece", "", "masterpiece"),
    ("", "a cat", "a cat"),
    ("{prompt}", "", ""),
])
def test_merge_prompts_like_the_webui(style: str, prompt: str, merged: str) -> None:
    assert merge_prompts(style, prompt) == merged


def test_shipped_presets() -> None:
    book = StyleBook(read_styles_csv(BUILTIN_STYLES_FILE))
    assert book.names() == ["Portrait quality", "Background wallpaper", "Common negative"]
    portrait, negative = book.apply("1girl, long hair", "", ["Portrait quality"])
    assert portrait == PORTRAIT + ", 1girl, long hair"
    assert negative == PORTRAIT_NEGATIVE
    wallpaper, negative = book.apply("", "", ["Background wallpaper"])
    assert wallpaper.startswith(WALLPAPER) and negative == WALLPAPER_NEGATIVE
    common = book.styles["Common negative"]
    assert "(best quality), (masterpiece), (high resolution)" in common.prompt
    assert common.negative_prompt.startswith("lowres, ((bad anatomy)), ((bad hands)), text, ")


def test_styles_apply_in_order() -> None:
    book = StyleBook(read_styles_csv(BUILTIN_STYLES_FILE))
    prompt, negative = book.apply("a knight", "blurry", ["Common negative", "Portrait quality"])
    assert prompt == PORTRAIT + ", (best quality), (masterpiece), (high resolution), a knight"
    assert negative.startswith("blurry, lowres, ") and negative.endswith(", " + PORTRAIT_NEGATIVE)


def test_unknown_style_names_its_index_and_lists_known_ones() -> None:
    book = StyleBook(read_styles_csv(BUILTIN_STYLES_FILE))
    with pytest.raises(FieldError) as info:
        book.apply("", "", ["Portrait quality", "portrait quality"])
    assert info.value.field == ("body", "styles", 1)
    assert "known styles: Portrait quality, Background wallpaper, Common negative" in info.value.message


def test_webui_file_formats(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_bytes('\ufeffname, prompt, negative_prompt\n"Ink", "ink drawing, {prompt}", "color"\n,ignored,\n'
                     .encode())
    assert read_styles_csv(path) == {"Ink": shared.webui.styles.PromptStyle("Ink", "ink drawing, {prompt}", "color")}
    path.write_text("name,text\nOld,sepia\n")  # the WebUI's first layout
    assert read_styles_csv(path)["Old"].prompt == "sepia"


def test_user_file_adds_and_replaces(tmp_path: Path) -> None:
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nPortrait quality,mine,\nInk,ink,\n")
    book = load_style_book(Settings(models=ModelSettings(models_dir=tmp_path)))
    assert book.styles["Portrait quality"].prompt == "mine"
    assert book.names()[-1] == "Ink" and "Common negative" in book.names()


def test_configured_file_and_reload_on_change(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.csv"
    path.write_text("name,prompt,negative_prompt\nInk,ink,\n")
    settings = Settings(models=ModelSettings(models_dir=tmp_path / "models", styles_file=path))
    assert load_style_book(settings).styles["Ink"].prompt == "ink"
    path.write_text("name,prompt,negative_prompt\nInk,ink v2,\n")
    os.utime(path, ns=(1, 1))
    assert load_style_book(settings).styles["Ink"].prompt == "ink v2"
    missing = Settings(models=ModelSettings(models_dir=tmp_path, styles_file=tmp_path / "missing.csv"))
    assert "Ink" not in load_style_book(missing).names()
