"""Build the OpenAI CLIP BPE tokenizer files that Stable Diffusion 1.x uses, without a model hub.

Why: model hubs are unreachable from the farm's machines, yet every SD1.5 checkpoint needs the
exact CLIP tokenizer (vocab 49408, bos 49406, eos 49407) or prompts map to the wrong embeddings.
The BPE merge list itself is MIT-licensed and ships inside the ``open-clip-torch`` wheel on PyPI
(``open_clip/bpe_simple_vocab_16e6.txt.gz``). This script reads that file straight out of the
wheel (no install: installing would pull torchvision) and rebuilds the vocabulary the way
open_clip's ``tokenizer.py`` does, then writes it in the Hugging Face ``CLIPTokenizer`` layout
(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json).

The output is committed under ``worker/assets/clip_tokenizer/``, the one copy every bundled config
uses (the worker passes it to ``from_single_file``; SDXL's second tokenizer is the same files padded
with "!"). Re-run only to regenerate it:

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/x
    python devtools/scripts/build_clip_tokenizer.py /tmp/x/open_clip_torch-3.3.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "worker" / "assets" / "clip_tokenizer"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # open_clip: merges = lines[1 : 49152 - 256 - 2 + 1]
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map used by GPT-2/CLIP BPE (same as open_clip)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def read_bpe_lines(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf, zf.open(BPE_MEMBER) as fh:
        return gzip.decompress(fh.read()).decode("utf-8").split("\n")


def build_vocab(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    merges = lines[1 : NUM_MERGES + 1]
    pairs = [tuple(m.split()) for m in merges]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(p) for p in pairs]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[BOS] != 49406 or vocab[EOS] != 49407:
        raise SystemExit(f"unexpected vocabulary: size {len(vocab)}, bos {vocab.get(BOS)}")
    return vocab, merges


def _added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer(out: Path, vocab: dict[str, int], merges: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": _added_token(BOS),
        "do_lower_case": True,
        "eos_token": _added_token(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token(EOS),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {
        "bos_token": {k: v for k, v in _added_token(BOS).items() if k != "__type"},
        "eos_token": {k: v for k, v in _added_token(EOS).items() if k != "__type"},
        "pad_token": EOS,
        "unk_token": {k: v for k, v in _added_token(EOS).items() if k != "__type"},
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="path to the downloaded open_clip_torch-*.whl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    vocab, merges = build_vocab(read_bpe_lines(args.wheel))
    write_tokenizer(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
