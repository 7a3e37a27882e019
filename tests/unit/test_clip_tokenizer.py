"""The bundled CLIP tokenizer must give the real OpenAI CLIP ids, or every prompt is misread.

The files are built by devtools/scripts/build_clip_tokenizer.py from the BPE list in the open-clip-torch
wheel; the expected ids below are those of openai/clip-vit-large-patch14 (the SD1.5 tokenizer). There is
one copy, worker/assets/clip_tokenizer: the config folders hold none, and the loader passes it in.
"""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "worker" / "assets" / "clip_tokenizer"
ASSETS = ROOT / "worker" / "assets"
CONFIGS = ASSETS / "configs"
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
ARCHITECTURES = ("sd15", "demo-tiny", "sdxl", "demo-tiny-sdxl")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def test_a_photo_of_a_cat_gives_the_real_clip_ids(tokenizer) -> None:
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_longer_prompt_matches_openai_clip(tokenizer) -> None:
    ids = tokenizer("a photograph of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_special_tokens_and_limits(tokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    assert tokenizer.model_max_length == 77
    padded = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert tokenizer("A CAT").input_ids == tokenizer("a cat").input_ids  # CLIP lower-cases


def test_vocab_file_shape() -> None:
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 49152 - 256 - 2


def test_one_copy_of_the_tokenizer_files() -> None:
    copies = sorted(str(p.relative_to(ASSETS)) for name in FILES for p in ASSETS.rglob(name))
    assert copies == sorted(f"clip_tokenizer/{name}" for name in FILES)
    assert not any(CONFIGS.glob("*/tokenizer*"))


@pytest.mark.skipif(
    not os.environ.get("OPEN_CLIP_WHEEL"),
    reason="set OPEN_CLIP_WHEEL to a downloaded open_clip_torch wheel to check the committed files",
)
def test_build_script_reproduces_committed_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = ROOT / "devtools" / "scripts" / "build_clip_tokenizer.py"
    wheel = os.environ["OPEN_CLIP_WHEEL"]
    subprocess.run([sys.executable, str(script), wheel, "--out", str(tmp_path)], check=True)
    for name in FILES:
        assert filecmp.cmp(tmp_path / name, TOKENIZER_DIR / name, shallow=False), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bundled_tokenizers_are_the_one_copy(arch: str) -> None:
    from worker.engine.checkpoint_loader import bundled_tokenizers

    tokenizers = bundled_tokenizers(arch)
    assert sorted(tokenizers) == (["tokenizer", "tokenizer_2"] if "sdxl" in arch else ["tokenizer"])
    assert tokenizers["tokenizer"]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("arch", ["sdxl", "demo-tiny-sdxl"])
def test_sdxl_second_tokenizer_differs_only_in_its_pad_token(arch: str) -> None:
    from worker.engine.checkpoint_loader import bundled_tokenizers

    tokenizers = bundled_tokenizers(arch)
    first, second = tokenizers["tokenizer"], tokenizers["tokenizer_2"]
    assert second.pad_token == "!" and second.pad_token_id == 0  # open_clip pads with zeros
    assert first.pad_token == "<|endoftext|>" and first.pad_token_id == 49407
    assert second.get_vocab() == first.get_vocab()
    first_map = {k: v for k, v in first.special_tokens_map.items() if k != "pad_token"}
    assert first_map == {k: v for k, v in second.special_tokens_map.items() if k != "pad_token"}
    text = "a photograph of an astronaut riding a horse, (masterpiece:1.2), unbelievably detailed"
    assert second(text)["input_ids"] == first(text)["input_ids"]  # the same BPE merges
    padded = second("a red boat", padding="max_length", max_length=77).input_ids
    assert padded[:5] == first("a red boat").input_ids and padded[5:] == [0] * 72


def test_a_saved_sdxl_pipeline_keeps_the_second_pad_token(tmp_path: Path) -> None:
    """What ``save_pretrained`` writes for tokenizer_2 (a diffusers folder made from a bundled model)."""
    from transformers import CLIPTokenizer

    from worker.engine.checkpoint_loader import bundled_tokenizers

    bundled_tokenizers("sdxl")["tokenizer_2"].save_pretrained(tmp_path / "tokenizer_2")
    saved = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2", local_files_only=True)
    assert saved.pad_token == "!" and saved("a cat").input_ids == [49406, 320, 2368, 49407]
