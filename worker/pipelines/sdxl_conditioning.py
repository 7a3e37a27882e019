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
Textual-inversion embeddings are not supported on SDXL yet: a prompt naming one is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.errors import FieldError
from worker.pipelines.conditioning import PromptEncoder, strip_extra_networks
from worker.pipelines.embeddings import Embedding, find_embedding_names

PENULTIMATE = -2
OPEN_CLIP_PAD_ID = 0  # the WebUI's FrozenOpenCLIPEmbedderWithCustomWords.id_pad


def is_sdxl_pipeline(pipe: Any) -> bool:
    """An SDXL pipeline has a second text encoder and a ``text_time`` UNet."""
    return getattr(pipe, "text_encoder_2", None) is not None


class SdxlPromptEncoder:
    """Encodes WebUI prompts with both SDXL text encoders; the interface of :class:`PromptEncoder`."""

    def __init__(self, pipe: Any) -> None:
        self.clip_l = PromptEncoder(pipe.tokenizer, pipe.text_encoder, hidden_layer=PENULTIMATE)
        self.clip_g = PromptEncoder(pipe.tokenizer_2, pipe.text_encoder_2, hidden_layer=PENULTIMATE,
                                    pad_id=OPEN_CLIP_PAD_ID)
        self.used_embeddings: dict[str, Embedding] = {}
        self.zero_empty_negative = True

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
    """Raise a FieldError when a prompt names a textual-inversion embedding: SDXL does not apply them yet,
    and silently encoding the name as plain text would render something the user did not ask for."""
    for field_name, text in prompts.items():
        found = find_embedding_names(tokenizer, embedding_names, strip_extra_networks(text or ""))
        if found:
            raise FieldError(("body", field_name), f"{field_name}: textual-inversion embeddings are not supported "
                                                   f"on SDXL checkpoints yet (found {', '.join(found)})")
