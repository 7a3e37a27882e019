"""The bundled CLIP tokenizer must give the real OpenAI CLIP ids, or every prompt is misread.

The files are built by devtools/scripts/build_clip_tokenizer.py from the BPE list in the open-clip-torch
wheel; the expected ids below are those of openai/clip-vit-large-patch14 (the SD1.5 tokenizer).
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
CONFIGS = ROOT / "worker" / "assets" / "configs"
# SDXL's second tokenizer is the same BPE with "!" as its padding token, so only its vocabulary is a copy.
CONFIG_COPIES = [
    CONFIGS / "sd15" / "tokenizer",
    CONFIGS / "demo-tiny" / "tokenizer",
    CONFIGS / "sdxl" / "tokenizer",
    CONFIGS / "demo-tiny-sdxl" / "tokenizer",
    CONFIGS / "sdxl" / "tokenizer_2",
    CONFIGS / "demo-tiny-sdxl" / "tokenizer_2",
]
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
VOCABULARY = ("vocab.json", "merges.txt")


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


@pytest.mark.parametrize("copy", CONFIG_COPIES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_folders_carry_identical_copies(copy: Path) -> None:
    for name in VOCABULARY if copy.name == "tokenizer_2" else FILES:
        assert filecmp.cmp(TOKENIZER_DIR / name, copy / name, shallow=False), f"{copy / name} differs"


@pytest.mark.skipif(
    not os.environ.get("OPEN_CLIP_WHEEL"),
    reason="set OPEN_CLIP_WHEEL to a downloaded open_clip_torch wheel to check the committed files",
)
def test_build_script_reproduces_committed_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = ROOT / "devtools" / "scripts" / "build_clip_tokenizer.py"
    wheel = os.environ["OPEN_CLIP_WHEEL"]
    subprocess.run([sys.executable, str(script), wheel, "--out", str(tmp_path), "--no-config-copies"], check=True)
    for name in FILES:
        assert filecmp.cmp(tmp_path / name, TOKENIZER_DIR / name, shallow=False), name


@pytest.mark.parametrize("arch", ["sdxl", "demo-tiny-sdxl"])
def test_sdxl_second_tokenizer_pads_with_exclamation_mark(arch: str) -> None:
    from transformers import CLIPTokenizer

    second = CLIPTokenizer.from_pretrained(CONFIGS / arch / "tokenizer_2", local_files_only=True)
    first = CLIPTokenizer.from_pretrained(CONFIGS / arch / "tokenizer", local_files_only=True)
    assert second.pad_token == "!" and second.pad_token_id == 0  # open_clip pads with zeros
    assert first.pad_token == "<|endoftext|>"
    assert second("a red boat")["input_ids"] == first("a red boat")["input_ids"]
