"""Textual-inversion embeddings from ``models/embeddings``, used by writing their file name in a prompt.

Why vectors are injected rather than tokens added: adding tokens to the tokenizer and text encoder
mutates objects every later job shares, and a job must never see another job's vocabulary. The WebUI
does the same (``EmbeddingsWithFixes``): the prompt's token ids are matched against each embedding's
name, the matched ids become placeholders, and during that one encoder call a forward hook on the
token-embedding layer overwrites the placeholder rows with the embedding's vectors.

Only ``.safetensors`` files are read (a ``.pt`` embedding is a pickle and is never opened). A file
holds one tensor ``[n_vectors, width]`` (the WebUI's ``emb_params`` or a diffusers concept); files
whose width does not fit the text encoder are skipped, as the WebUI skips them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # [n, width], float32 on the CPU
    short_hash: str  # first 12 hex digits of the file's SHA-256, as in the WebUI's "TI hashes"

    @property
    def width(self) -> int:
        return int(self.vectors.shape[-1])


class SdxlEmbeddingFile(ValueError):
    """An SDXL embedding (worker.engine.sdxl_conditioning reads those): not for an SD1.x text encoder."""


def load_embedding_file(path: Path) -> Embedding:
    """Read one embedding file; raises ValueError when it is not a single-term embedding."""
    tensors = load_file(str(path), device="cpu")
    if {"clip_l", "clip_g"} & tensors.keys():
        raise SdxlEmbeddingFile(f"{path.name}: an SDXL embedding (clip_l/clip_g)")
    if "emb_params" in tensors:
        vectors = tensors["emb_params"]
    elif len(tensors) == 1:
        vectors = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path.name}: holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}); "
                         "expected one embedding tensor (emb_params)")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2:
        raise ValueError(f"{path.name}: embedding tensor has shape {list(vectors.shape)}; expected [n, width]")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return Embedding(path.stem, vectors.detach().to(torch.float32), digest)


class VersionedFiles(Generic[T]):
    """Each file parsed once per version (modification time, size). A file that fails to parse is skipped,
    as the WebUI skips it, and said so once per version (``quiet`` errors are not said at all)."""

    def __init__(self, parse: Callable[[Path], T | None], kind: str,
                 quiet: tuple[type[Exception], ...] = ()) -> None:
        self.parse, self.kind, self.quiet = parse, kind, quiet
        self._cache: dict[Path, tuple[tuple[int, int], T | None]] = {}

    def get(self, path: Path) -> T | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        parsed: T | None = None
        try:
            parsed = self.parse(path)
        except self.quiet:
            pass
        except Exception as exc:
            log.warning("skipping %s %s: %s", self.kind, path.name, exc)
        self._cache[path] = (version, parsed)
        return parsed


class EmbeddingLibrary:
    """The embeddings folder, re-scanned each job (cheap) and each file parsed once per version."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._files: VersionedFiles[Embedding] = VersionedFiles(load_embedding_file, "embedding",
                                                               quiet=(SdxlEmbeddingFile,))

    def available(self, width: int) -> dict[str, Embedding]:
        """Embeddings whose vectors fit a text encoder of this hidden width, by name."""
        found: dict[str, Embedding] = {}
        if not self.folder.is_dir():
            return found
        for path in sorted(self.folder.rglob("*.safetensors")):
            embedding = self._load(path)
            if embedding is not None and embedding.width == width:
                found.setdefault(embedding.name, embedding)
        return found

    def names(self) -> list[str]:
        """Every embedding file's name (``.safetensors`` stems), loadable or not."""
        if not self.folder.is_dir():
            return []
        return sorted({path.stem for path in self.folder.rglob("*.safetensors")})

    def _load(self, path: Path) -> Embedding | None:
        return self._files.get(path)


class EmbeddingMatcher:
    """Finds embedding names in a prompt's token ids (``EmbeddingDatabase.find_embedding_at_position``)."""

    def __init__(self, tokenizer: Any, embeddings: dict[str, Embedding]) -> None:
        self._by_first_id: dict[int, list[tuple[list[int], Embedding]]] = {}
        for name, embedding in embeddings.items():
            ids = tokenizer([name], truncation=False, add_special_tokens=False)["input_ids"][0]
            if ids:
                self._by_first_id.setdefault(ids[0], []).append((ids, embedding))
        for candidates in self._by_first_id.values():
            candidates.sort(key=lambda item: len(item[0]), reverse=True)

    def match(self, tokens: list[int], position: int) -> tuple[Embedding | None, int]:
        """The embedding whose name starts at ``position`` and how many tokens the name spans."""
        for ids, embedding in self._by_first_id.get(tokens[position], ()):
            if tokens[position : position + len(ids)] == ids:
                return embedding, len(ids)
        return None, 0


def find_embedding_names(tokenizer: Any, names: list[str], text: str) -> list[str]:
    """The embedding names that occur in ``text`` where the WebUI would match them (whole token runs)."""
    if not names or not text:
        return []
    placeholders = {name: Embedding(name, torch.zeros(1, 1), "") for name in names}
    matcher = EmbeddingMatcher(tokenizer, placeholders)
    tokens = tokenizer([text], truncation=False, add_special_tokens=False)["input_ids"][0]
    found: list[str] = []
    position = 0
    while position < len(tokens):
        embedding, length = matcher.match(tokens, position)
        if embedding is not None and embedding.name not in found:
            found.append(embedding.name)
        position += max(length, 1)
    return found


class VectorInjection:
    """A forward hook that overwrites placeholder rows of the token embeddings for one encoder call.

    ``fixes[b]`` lists ``(offset, embedding)`` for row ``b`` of the batch; the hook is removed on exit,
    so nothing outlives the call.
    """

    def __init__(self, token_embedding: torch.nn.Module, fixes: list[list[tuple[int, Embedding]]]) -> None:
        self.module = token_embedding
        self.fixes = fixes
        self._handle: Any = None

    def __enter__(self) -> VectorInjection:
        if any(self.fixes):
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, fixes in enumerate(self.fixes):
            for offset, embedding in fixes:
                length = min(output.shape[1] - offset, embedding.vectors.shape[0])
                if length > 0:
                    vectors = embedding.vectors[:length].to(device=output.device, dtype=output.dtype)
                    output[row, offset : offset + length] = vectors
        return output
