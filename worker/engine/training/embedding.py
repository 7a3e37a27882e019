"""Textual inversion: the WebUI's ``create_embedding`` and the trained side of ``train_embedding``.

The embedding is ``nvpt`` vectors of the text encoder's token-embedding width, initialised from
``init_text``'s token embeddings (the text's first ``nvpt`` tokens, each vector ``i`` taking token
``i * tokens // nvpt``, so fewer tokens repeat and more are cut; an empty text, or one with no tokens, gives
zeros). ``init_text`` "*" is the token "*" as in the WebUI, not zeros. In the training prompts ``[name]``
becomes the embedding's name, and the name's tokens are replaced by the trained vectors through
:class:`worker.engine.embeddings.VectorInjection`, the hook the renders use, so the name works in a prompt
afterwards exactly as it worked while training. Only the vectors are trained (AdamW, weight decay 0, as the
WebUI); the text encoder and UNet are read, never written.

The output is a ``.safetensors`` file holding ``emb_params`` ``[nvpt, width]`` float32 and, as metadata, the
WebUI's ``name``, ``step``, ``sd_checkpoint`` (the model's short hash) and ``sd_checkpoint_name``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import save

from shared.jobs.training_spec import TrainSpec
from worker.engine.conditioning import PromptEncoder
from worker.engine.embeddings import Embedding

TENSOR = "emb_params"


def initial_vectors(tokenizer: Any, token_embedding: torch.nn.Embedding, init_text: str, nvpt: int) -> torch.Tensor:
    """``[nvpt, width]`` float32 on the CPU, as the WebUI's ``create_embedding`` fills them."""
    weight = token_embedding.weight
    vectors = torch.zeros((nvpt, int(weight.shape[1])), dtype=torch.float32)
    if not init_text:
        return vectors
    ids = tokenizer(init_text, add_special_tokens=False, truncation=False)["input_ids"][:nvpt]
    if not ids:
        return vectors
    with torch.no_grad():
        embedded = token_embedding(torch.tensor(ids, device=weight.device)).float().cpu()
    for i in range(nvpt):
        vectors[i] = embedded[i * len(ids) // nvpt]
    return vectors


def encode_with_grad(encoder: PromptEncoder, texts: list[str]) -> torch.Tensor:
    """:meth:`PromptEncoder.encode` (same chunks, padding and emphasis) with gradients flowing to the vectors;
    ``encode`` itself runs under ``no_grad`` for the renders."""
    batch_chunks = [encoder.tokenize_line(text) for text in texts]
    count = max(len(chunks) for chunks in batch_chunks)
    zs = []
    for i in range(count):
        batch = [chunks[i] if i < len(chunks) else encoder.empty_chunk() for chunks in batch_chunks]
        zs.append(encoder._process_tokens(batch)[0])
    return torch.hstack(zs)


def embedding_file(name: str, vectors: torch.Tensor, step: int, spec: TrainSpec) -> bytes:
    """The WebUI's embedding as a safetensors file (what ``load_embedding_file`` reads)."""
    metadata = {"name": name, "step": str(step), "sd_checkpoint_name": spec.model}
    if spec.model_hash:
        metadata["sd_checkpoint"] = spec.model_hash
    return save({TENSOR: vectors.detach().to("cpu", torch.float32).contiguous()}, metadata=metadata)


class EmbeddingTrainee:
    """The vectors being trained and how they enter the conditioning."""

    def __init__(self, pipeline: Any, spec: TrainSpec) -> None:
        self.spec = spec
        self.placeholder = spec.name
        text_encoder = pipeline.text_encoder
        token_embedding = text_encoder.get_input_embeddings()
        start = initial_vectors(pipeline.tokenizer, token_embedding, spec.init_text, spec.nvpt)
        self.vectors = start.to(token_embedding.weight.device).requires_grad_(True)
        embedding = Embedding(spec.name, self.vectors, "")
        self.encoder = PromptEncoder(pipeline.tokenizer, text_encoder, {spec.name: embedding})

    def parameters(self) -> list[torch.Tensor]:
        return [self.vectors]

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([self.vectors], lr=1.0, weight_decay=0.0)  # lr is set every step

    def tensors(self) -> dict[str, torch.Tensor]:
        return {TENSOR: self.vectors}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        saved = tensors.get(TENSOR)
        if set(tensors) != {TENSOR} or saved is None or saved.shape != self.vectors.shape:
            raise ValueError(f"the checkpoint's tensors do not fit this embedding ({list(tensors)})")
        with torch.no_grad():
            self.vectors.copy_(saved)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        yield  # the vectors enter through the prompt encoder's hook, per call

    def set_training(self, on: bool) -> None:
        pass

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        return encode_with_grad(self.encoder, prompts)

    def output(self, step: int) -> bytes:
        return embedding_file(self.spec.name, self.vectors, step, self.spec)
