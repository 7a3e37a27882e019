"""Prompt conditioning exactly as the WebUI builds it (``sd_hijack_clip.py``, ``prompt_parser.py``).

Why not the stock diffusers encoder: it truncates at 77 tokens and knows no emphasis. The WebUI
instead splits a prompt into 75-token chunks (a ``BREAK`` or, near the end of a chunk, the last comma
starts the next one), encodes each chunk as BOS + 75 + EOS, multiplies every token's hidden state by
its emphasis weight and rescales the chunk so its mean is what it was, and concatenates the chunks.
Clip skip N takes the hidden state N layers from the end and applies the final layer norm.

Scheduled prompts become one conditioning per schedule segment; the sampler picks the one whose
``end_at_step`` is the first >= the current model-evaluation index (``reconstruct_cond_batch``).
``AND`` sub-prompts each get their own schedule and weight (composable diffusion); negative prompts
get the same syntax except ``AND``. Malformed syntax is never an error: it is encoded as text.

SDXL (:mod:`worker.engine.sdxl_conditioning`) reuses :class:`PromptEncoder` once per text encoder
(``hidden_layer=-2``: the penultimate hidden state without final layer norm, and for the OpenCLIP
encoder ``pad_id=0`` after the first end token); each schedule entry then also carries the pooled
embedding, and :class:`JobConditioning` the size conditioning (``time_ids``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.webui.prompts import extract_lora_tags, parse_prompt_attention, prompt_schedules, split_and_prompts
from worker.engine.embeddings import Embedding, EmbeddingMatcher, VectorInjection

CHUNK_LENGTH = 75
# The WebUI's default "Prompt word wrap length limit" (opts.comma_padding_backtrack).
COMMA_PADDING_BACKTRACK = 20
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# ":<number>]" closes a scheduled prompt ([from:to:when]); see hires_timeline_prompt.
_SCHEDULE_WHEN = re.compile(r"(?<!\\):(\s*)([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(\s*)\]")


def strip_extra_networks(prompt: str) -> str:
    """Remove ``<lora:...>`` (and every other ``<network:...>``) tag; a malformed weight is no error."""
    try:
        return extract_lora_tags(prompt)[0]
    except ValueError:
        return _EXTRA_NETWORK.sub("", prompt)


def parse_attention_safely(text: str) -> list[list[str | float]]:
    """The WebUI's emphasis runs; text whose explicit weight is not a number is taken as plain text."""
    try:
        return parse_prompt_attention(text)
    except ValueError:
        runs: list[list[str | float]] = []
        for index, part in enumerate(_BREAK.split(text)):
            if index:
                runs.append(["BREAK", -1])
            runs.append([part, 1.0])
        return runs


def hires_timeline_prompt(prompt: str, base_steps: int, hires_steps: int) -> str:
    """Rewrite ``[a:b:when]`` numbers into the hires pass's own step numbers (WebUI 1.6+ timeline).

    In the second pass a fractional ``when`` counts from the end of the first pass in units of the
    hires steps (``1.5`` is half-way through it) and an integer counts first-pass steps before it.
    ``prompt_schedules`` knows only one timeline, so each ``when`` is replaced by the hires step it
    means, written as an integer.
    """

    def replace(match: re.Match[str]) -> str:
        number = match.group(2)
        try:
            value = float(number)
        except ValueError:
            return match.group(0)
        if value != value or value in (float("inf"), float("-inf")):
            return match.group(0)
        shifted = (value - 1.0) * hires_steps if "." in number else value - base_steps
        return f":{match.group(1)}{int(shifted)}{match.group(3)}]"

    return _SCHEDULE_WHEN.sub(replace, prompt)


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)  # (offset in the 77 tokens, embedding)


class PromptEncoder:
    """Encodes WebUI prompts with one pipeline's tokenizer and text encoder for one job."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        embeddings: dict[str, Embedding] | None = None,
        clip_skip: int = 1,
        comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
        hidden_layer: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        """``hidden_layer`` (SDXL) takes that hidden state as is and ignores clip skip; ``pad_id`` replaces
        every token after a chunk's first end token before encoding (OpenCLIP pads with 0, "!")."""
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = max(1, int(clip_skip))
        self.hidden_layer = hidden_layer
        self.pad_id = pad_id
        self.backtrack = comma_padding_backtrack
        self.matcher = EmbeddingMatcher(tokenizer, embeddings or {})
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.comma_token = tokenizer.get_vocab().get(",</w>")
        self.used_embeddings: dict[str, Embedding] = {}
        # The WebUI zeroes an all-empty negative prompt on SDXL only (sd_models_xl.get_learned_conditioning).
        self.zero_empty_negative = False

    def tokenize_line(self, line: str) -> list[PromptChunk]:
        """A prompt as 77-token chunks with per-token weights (``tokenize_line``)."""
        parsed = parse_attention_safely(line)
        tokenized = self.tokenizer([str(text) for text, _ in parsed], truncation=False,
                                   add_special_tokens=False)["input_ids"]
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        last_comma = -1

        def next_chunk() -> None:
            nonlocal chunk, last_comma
            to_add = CHUNK_LENGTH - len(chunk.tokens)
            chunk.tokens += [self.id_end] * to_add
            chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start, *chunk.tokens, self.id_end]
            chunk.multipliers = [1.0, *chunk.multipliers, 1.0]
            chunk.fixes = [(offset + 1, embedding) for offset, embedding in chunk.fixes]
            chunks.append(chunk)
            chunk, last_comma = PromptChunk(), -1

        for tokens, (text, weight) in zip(tokenized, parsed, strict=True):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (self.backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(chunk.tokens) - last_comma <= self.backtrack):
                    # Move the words after the last comma to the next chunk rather than split them.
                    cut = last_comma + 1
                    moved = PromptChunk(chunk.tokens[cut:], chunk.multipliers[cut:],
                                        [(o - cut, e) for o, e in chunk.fixes if o >= cut])
                    chunk = PromptChunk(chunk.tokens[:cut], chunk.multipliers[:cut],
                                        [(o, e) for o, e in chunk.fixes if o < cut])
                    next_chunk()
                    chunk = moved
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()
                embedding, name_length = self.matcher.match(tokens, position)
                vectors = 0 if embedding is None else int(embedding.vectors.shape[0])
                if embedding is None or vectors > CHUNK_LENGTH:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(float(weight))
                    position += 1
                    continue
                if len(chunk.tokens) + vectors > CHUNK_LENGTH:
                    next_chunk()
                chunk.fixes.append((len(chunk.tokens), embedding))
                chunk.tokens += [0] * vectors  # placeholders, overwritten by the embedding's vectors
                chunk.multipliers += [float(weight)] * vectors
                position += name_length
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks

    def empty_chunk(self) -> PromptChunk:
        return PromptChunk([self.id_start] + [self.id_end] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(len(texts), 77 * chunks, width)``; texts with fewer chunks are padded with empty ones.

        Like the WebUI, the texts are encoded together, so a prompt's schedule segments share the
        mean restoration of each chunk.
        """
        return self.encode_with_pooled(texts)[0]

    @torch.no_grad()
    def encode_with_pooled(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode`, plus the encoder's pooled projection of each text's first chunk (``zs[0].pooled``
        in the WebUI) when the text encoder has one (``CLIPTextModelWithProjection``), else None."""
        batch_chunks = [self.tokenize_line(text) for text in texts]
        count = max(len(chunks) for chunks in batch_chunks)
        zs, pooled = [], None
        for i in range(count):
            batch = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            for chunk in batch:
                for _, embedding in chunk.fixes:
                    self.used_embeddings[embedding.name] = embedding
            z, chunk_pooled = self._process_tokens(batch)
            zs.append(z)
            if i == 0:
                pooled = chunk_pooled
        return torch.hstack(zs), pooled

    def _padded(self, tokens: list[int]) -> list[int]:
        if self.pad_id is None or self.pad_id == self.id_end:
            return tokens
        end = tokens.index(self.id_end)
        return tokens[: end + 1] + [self.pad_id] * (len(tokens) - end - 1)

    def _process_tokens(self, batch: list[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.text_encoder.device
        tokens = torch.asarray([self._padded(chunk.tokens) for chunk in batch], device=device)
        hidden = self.hidden_layer is not None or self.clip_skip > 1
        with VectorInjection(self.text_encoder.get_input_embeddings(), [chunk.fixes for chunk in batch]):
            outputs = self.text_encoder(input_ids=tokens, output_hidden_states=hidden)
        pooled = getattr(outputs, "text_embeds", None)
        if self.hidden_layer is not None:
            z = outputs.hidden_states[self.hidden_layer]
        elif self.clip_skip > 1:
            hidden = outputs.hidden_states[-min(self.clip_skip, len(outputs.hidden_states))]
            z = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm(hidden)
        else:
            z = outputs.last_hidden_state
        # Emphasis "Original": weight each token, then restore the chunk batch's mean.
        multipliers = torch.asarray([chunk.multipliers for chunk in batch], device=device, dtype=z.dtype)
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        ratio = original_mean / z.mean()
        # A chunk whose mean is exactly 0 (only seen with untrained layer norms) cannot be rescaled.
        return (z * ratio if bool(torch.isfinite(ratio)) else z), pooled


@dataclass(frozen=True)
class ScheduledCond:
    end_at_step: int
    cond: torch.Tensor  # (tokens, width)
    pooled: torch.Tensor | None = None  # (projection_dim,): SDXL's pooled text embedding


def entry_at(schedule: list[ScheduledCond], step: int) -> ScheduledCond:
    """The schedule entry for model evaluation ``step`` (0-based), as ``reconstruct_cond_batch`` picks it."""
    for entry in schedule:
        if step <= entry.end_at_step:
            return entry
    return schedule[0]


@dataclass(frozen=True)
class StepConditioning:
    uncond: torch.Tensor  # (tokens_u, width)
    conds: torch.Tensor  # (n_subprompts, tokens_c, width)
    weights: list[float]
    # SDXL only: pooled embeddings (n_subprompts, P) / (P,) and the size conditioning (6,).
    conds_pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


@dataclass
class JobConditioning:
    """A job's positive (AND sub-prompts with weights) and negative conditioning over its steps."""

    uncond: list[ScheduledCond]
    conds: list[tuple[list[ScheduledCond], float]]
    time_ids: torch.Tensor | None = None  # SDXL: (original h, w, crop top, left, target h, w)

    def at_step(self, step: int) -> StepConditioning:
        entries = [entry_at(schedule, step) for schedule, _ in self.conds]
        tensors = [entry.cond for entry in entries]
        longest = max(t.shape[0] for t in tensors)
        # Sub-prompts of different lengths are padded with their last vector (reconstruct_multicond_batch).
        padded = [t if t.shape[0] == longest else torch.vstack([t, t[-1:].repeat(longest - t.shape[0], 1)])
                  for t in tensors]
        uncond = entry_at(self.uncond, step)
        step_cond = StepConditioning(uncond.cond, torch.stack(padded), [w for _, w in self.conds])
        if uncond.pooled is None:
            return step_cond
        pooled = torch.stack([entry.pooled for entry in entries if entry.pooled is not None])
        return StepConditioning(step_cond.uncond, step_cond.conds, step_cond.weights, pooled, uncond.pooled,
                                self.time_ids)


def learned_schedule(encoder: PromptEncoder, prompt: str, steps: int, negative: bool = False) -> list[ScheduledCond]:
    """One conditioning per schedule segment of a prompt (``get_learned_conditioning``).

    On SDXL (``encoder.zero_empty_negative``) a negative prompt whose every segment is empty is all
    zeros, text and pooled embedding alike, as the WebUI's ``force_zero_embeddings=['txt']``.
    """
    schedule = prompt_schedules(prompt, steps)
    texts = [str(text) for _, text in schedule]
    conds, pooled = encoder.encode_with_pooled(texts)
    if negative and encoder.zero_empty_negative and all(text == "" for text in texts):
        conds = torch.zeros_like(conds)
        pooled = torch.zeros_like(pooled) if pooled is not None else None
    return [ScheduledCond(int(end), conds[i], None if pooled is None else pooled[i])
            for i, (end, _) in enumerate(schedule)]


def build_conditioning(
    encoder: PromptEncoder, prompt: str, negative_prompt: str, steps: int,
    hires_base_steps: int | None = None,
) -> JobConditioning:
    """Conditioning for a pass of ``steps`` model evaluations.

    ``hires_base_steps`` marks the hires pass: scheduled prompts then follow the WebUI's hires timeline
    (see :func:`hires_timeline_prompt`) with the first pass's step count as the base.
    """
    prompt = strip_extra_networks(prompt)
    if hires_base_steps is not None:
        prompt = hires_timeline_prompt(prompt, hires_base_steps, steps)
        negative_prompt = hires_timeline_prompt(negative_prompt, hires_base_steps, steps)
    cache: dict[str, list[ScheduledCond]] = {}
    conds = []
    for text, weight in split_and_prompts(prompt):
        if text not in cache:
            cache[text] = learned_schedule(encoder, text, steps)
        conds.append((cache[text], weight))
    return JobConditioning(learned_schedule(encoder, negative_prompt, steps, negative=True), conds)
