"""SDXL prompt conditioning as the WebUI builds it (``sd_models_xl.py``, ``sd_hijack_clip.py``, SGM's conditioner).

SDXL base has two text encoders that read the same prompt: CLIP ViT-L (768 wide) and OpenCLIP
ViT-bigG (1280 wide, with a projection). The WebUI wraps each in its own prompt encoder, so the 75-token
chunks, ``BREAK``, emphasis and the mean restoration happen per encoder; the UNet's cross-attention
input is both penultimate hidden states (no final layer norm) concatenated to 2048 wide. The OpenCLIP
tokens after each chunk's first end token are 0 ("!"), OpenCLIP's padding. Its pooled, projected output
for the first chunk, together with the size conditioning (original size, crop top-left (0, 0), target
size; all the image's own size, as the WebUI sets them), goes to the UNet's ``add_embedding``
(diffusers' ``added_cond_kwargs``: ``text_embeds`` and ``time_ids``).

Clip skip does not apply (the WebUI's ``sdxl_clip_l_skip`` is off by default), and an all-empty
negative prompt is zeros rather than the encoding of "" (``force_zero_embeddings=['txt']``).

Textual-inversion embeddings for SDXL hold one tensor per encoder, ``clip_l`` ``[n, 768]`` and ``clip_g``
``[n, 1280]`` (the WebUI's format); each encoder injects its own part where the prompt names the file, and
the infotext's ``TI hashes`` lists it once. A prompt naming an embedding that is not in that format (an
SD1.5 one, or widths that do not fit the checkpoint) is refused: encoding the name as plain text would
render something the user did not ask for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared.errors import FieldError
from worker.engine.conditioning import PromptEncoder, strip_extra_networks
from worker.engine.embeddings import Embedding, VersionedFiles, find_embedding_names

PENULTIMATE = -2
OPEN_CLIP_PAD_ID = 0  # the WebUI's FrozenOpenCLIPEmbedderWithCustomWords.id_pad


def is_sdxl_pipeline(pipe: Any) -> bool:
    """An SDXL pipeline has a second text encoder and a ``text_time`` UNet."""
    return getattr(pipe, "text_encoder_2", None) is not None


@dataclass(frozen=True)
class SdxlEmbedding:
    """One SDXL textual-inversion file: the same name and hash, a vector set per text encoder."""

    clip_l: Embedding
    clip_g: Embedding


def load_sdxl_embedding(path: Path) -> SdxlEmbedding | None:
    """The file's ``clip_l`` / ``clip_g`` vectors, or None when it is no SDXL embedding (an SD1.5 one).

    Raises ValueError for an SDXL file whose tensors are not ``[n, width]`` with the same ``n``.
    """
    with safe_open(str(path), "pt") as handle:
        if not {"clip_l", "clip_g"} <= set(handle.keys()):
            return None
    tensors = load_file(str(path), device="cpu")
    clip_l, clip_g = tensors["clip_l"], tensors["clip_g"]
    if clip_l.dim() != 2 or clip_g.dim() != 2 or clip_l.shape[0] != clip_g.shape[0]:
        raise ValueError(f"{path.name}: clip_l {list(clip_l.shape)} and clip_g {list(clip_g.shape)} "
                         "are not [n, width] with the same n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return SdxlEmbedding(Embedding(path.stem, clip_l.detach().float(), digest),
                         Embedding(path.stem, clip_g.detach().float(), digest))


class SdxlEmbeddingLibrary:
    """The SDXL embeddings of an embeddings folder, re-scanned each job, each file parsed once per version."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._files: VersionedFiles[SdxlEmbedding] = VersionedFiles(load_sdxl_embedding, "SDXL embedding")

    def available(self, width_l: int, width_g: int) -> dict[str, SdxlEmbedding]:
        """SDXL embeddings whose two parts fit text encoders of these widths, by name."""
        found: dict[str, SdxlEmbedding] = {}
        if not self.folder.is_dir():
            return found
        for path in sorted(self.folder.rglob("*.safetensors")):
            embedding = self._load(path)
            if embedding is not None and (embedding.clip_l.width, embedding.clip_g.width) == (width_l, width_g):
                found.setdefault(path.stem, embedding)
        return found

    def _load(self, path: Path) -> SdxlEmbedding | None:
        return self._files.get(path)


class SdxlPromptEncoder:
    """Encodes WebUI prompts with both SDXL text encoders; the interface of :class:`PromptEncoder`."""

    def __init__(self, pipe: Any, embeddings: dict[str, SdxlEmbedding] | None = None) -> None:
        embeddings = embeddings or {}
        self.clip_l = PromptEncoder(pipe.tokenizer, pipe.text_encoder, hidden_layer=PENULTIMATE,
                                    embeddings={name: e.clip_l for name, e in embeddings.items()})
        self.clip_g = PromptEncoder(pipe.tokenizer_2, pipe.text_encoder_2, hidden_layer=PENULTIMATE,
                                    pad_id=OPEN_CLIP_PAD_ID,
                                    embeddings={name: e.clip_g for name, e in embeddings.items()})
        self.zero_empty_negative = True

    @property
    def used_embeddings(self) -> dict[str, Embedding]:
        """Embeddings the encoded prompts used, by name (one entry per file: both parts share the hash)."""
        return {**self.clip_g.used_embeddings, **self.clip_l.used_embeddings}

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.encode_with_pooled(texts)[0]

    @torch.no_grad()
    def encode_with_pooled(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(len(texts), 77 * chunks, 768 + 1280)`` and the pooled ``(len(texts), 1280)``."""
        z_l, _ = self.clip_l.encode_with_pooled(texts)
        z_g, pooled = self.clip_g.encode_with_pooled(texts)
        if z_l.shape[:2] != z_g.shape[:2]:
            raise RuntimeError(f"SDXL text encoders disagree on the prompt's chunks: {z_l.shape} vs {z_g.shape}")
        return torch.cat([z_l, z_g.to(z_l.dtype)], dim=-1), pooled


def sdxl_time_ids(width: int, height: int, crop_top: int = 0, crop_left: int = 0) -> torch.Tensor:
    """SDXL's size conditioning for a pass at ``width`` x ``height``: ``(h, w, top, left, h, w)``."""
    return torch.tensor([height, width, crop_top, crop_left, height, width], dtype=torch.float32)


def refuse_sdxl_embeddings(tokenizer: Any, embedding_names: list[str], prompts: dict[str, str]) -> None:
    """Raise a FieldError when a prompt names one of ``embedding_names``, the embeddings this SDXL checkpoint
    cannot apply (not ``clip_l`` + ``clip_g``, or other widths): silently encoding the name as plain text
    would render something the user did not ask for."""
    for field_name, text in prompts.items():
        found = find_embedding_names(tokenizer, embedding_names, strip_extra_networks(text or ""))
        if found:
            raise FieldError(("body", field_name), f"{field_name}: textual-inversion embeddings {', '.join(found)} "
                                                   "are not SDXL embeddings for this checkpoint (an SDXL embedding "
                                                   "holds clip_l and clip_g vectors of its text encoders' widths)")


def sdxl_prompt_encoder(pipe: Any, library: SdxlEmbeddingLibrary, embedding_names: list[str],
                        prompts: dict[str, str]) -> SdxlPromptEncoder:
    """The job's SDXL prompt encoder with the SDXL embeddings that fit ``pipe``; a prompt naming any other of
    the folder's ``embedding_names`` is refused (:func:`refuse_sdxl_embeddings`)."""
    usable = library.available(int(pipe.text_encoder.get_input_embeddings().weight.shape[-1]),
                               int(pipe.text_encoder_2.get_input_embeddings().weight.shape[-1]))
    refuse_sdxl_embeddings(pipe.tokenizer, [name for name in embedding_names if name not in usable], prompts)
    return SdxlPromptEncoder(pipe, usable)
