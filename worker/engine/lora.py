"""LoRAs on a warm pipeline: which ones a job asks for, and a two-tier cache that switches them fast.

Why tiers: reading and parsing a LoRA file and injecting it into the UNet and text encoder costs far
more than re-pointing the pipeline at adapters it already holds. So a loaded pipeline keeps its
recently used LoRAs as named peft adapters (diffusers' ``load_lora_weights``) and a job only calls
``set_adapters`` with its own names and weights; adapters beyond the budget are deleted least recently
used first. Parsed state dicts are kept in RAM (LRU by count and bytes, shared between pipelines), so
re-loading an evicted adapter does not touch the disk either. The disk is read only on a miss.

No leakage: every job sets the complete adapter set it needs (or disables LoRA entirely), so nothing a
previous job selected stays active. Disabled peft layers return exactly ``base_layer(x)``, so a job
without LoRA gives the same pixels as on a pipeline that never saw one (tested pixel for pixel).

SDXL pipelines work the same way: ``load_lora_weights`` of diffusers' SDXL pipeline reads kohya files
(SGM UNet names, ``lora_te1_`` / ``lora_te2_`` for the two text encoders) and diffusers files (``unet.``,
``text_encoder.``, ``text_encoder_2.``), and the switch covers the second text encoder's layers too.

An adapter is named after the file's resolved path, size and modification time: a file replaced on
disk gets a new adapter and the stale one ages out.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.webui.hashes import HashCache

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Loader = Callable[[str], StateDict]


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA a job applies: display name (for the infotext), multiplier, file and its short hash."""

    name: str
    weight: float
    path: Path
    short_hash: str | None = None


def _resolve_file(lora_dir: Path, file_name: str, field: tuple[str, ...]) -> Path:
    """The LoRA file inside ``lora_dir``; escapes, pickles and missing files are the job's error."""
    root = lora_dir.resolve()
    path = (lora_dir / file_name).resolve()
    if not path.is_relative_to(root) or Path(file_name).is_absolute():
        raise FieldError(field, f"LoRA file {file_name!r} is outside the Lora folder")
    if path.suffix.lower() != ".safetensors":
        raise FieldError(field, f"LoRA file {file_name!r} is not a .safetensors file; only safetensors are loaded")
    if not path.is_file():
        raise FieldError(field, f"unknown LoRA: no file {file_name!r} in the Lora folder")
    return path


def job_loras(spec: RenderSpec, lora_dir: Path) -> list[LoraRequest]:
    """The job's LoRA set (``spec.loras``: the API's merged list; for older rows, the prompt's tags)."""
    lora_dir = Path(lora_dir)
    return [
        LoraRequest(lora.name, lora.weight, _resolve_file(lora_dir, lora.file, ("body", "loras", str(i))),
                    lora.hash or None)
        for i, lora in enumerate(spec.loras)
    ]


class StateDictCache:
    """Parsed LoRA files in RAM, least recently used evicted beyond ``max_count`` files or ``max_bytes``.

    ``reads`` counts files actually read from disk, so tests and benchmarks can prove a hit is a hit.
    """

    def __init__(self, max_count: int = 32, max_bytes: int = 2 << 30, loader: Loader = load_file) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self._loader = loader
        self._items: OrderedDict[str, tuple[StateDict, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def get(self, key: str, path: Path) -> StateDict:
        """The state dict cached under ``key`` (file identity), reading ``path`` only on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        state = self._loader(str(path))
        size = sum(t.numel() * t.element_size() for t in state.values())
        with self._lock:
            self.reads += 1
            self._items[key] = (state, size)
            while len(self._items) > 1 and (len(self._items) > self.max_count or self.nbytes > self.max_bytes):
                self._items.popitem(last=False)
        return state


def lora_components(pipe: Any) -> list[torch.nn.Module]:
    """The models a LoRA may patch: the UNet and every text encoder (SDXL's OpenCLIP-G one as well)."""
    names = ("unet", "text_encoder", "text_encoder_2")
    return [module for module in (getattr(pipe, name, None) for name in names) if module is not None]


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def adapter_name(file_key: str) -> str:
    """A peft-safe adapter name for a file identity (no dots; stable across jobs)."""
    return "lora_" + hashlib.sha1(file_key.encode()).hexdigest()[:16]


class LoraCache:
    """The adapters resident on ONE pipeline plus a (possibly shared) RAM tier of parsed files.

    Holds no reference to the pipeline (it is passed to :meth:`apply`), so it can be keyed by it weakly.
    """

    def __init__(self, files: StateDictCache | None = None, max_resident: int = 8,
                 max_resident_bytes: int = 1 << 30, hashes: HashCache | None = None) -> None:
        self.files = files if files is not None else StateDictCache()
        self.max_resident, self.max_resident_bytes = max_resident, max_resident_bytes
        self.hashes = hashes if hashes is not None else HashCache()
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter name -> bytes, LRU first
        self._names: dict[str, str] = {}  # adapter name -> file path, for describe()
        self.adapter_loads = 0
        self.active: list[tuple[str, float]] = []
        self._layers: list[Any] | None = None  # the pipeline's peft LoRA layers; reset on load/delete

    def resident(self) -> list[str]:
        """File names of the resident adapters, least recently used first (for the heartbeat)."""
        return [Path(self._names[name]).stem for name in self._resident]

    def short_hash(self, request: LoraRequest) -> str:
        """The request's hash as the API recorded it, else computed once per file version."""
        return request.short_hash or self.hashes.lora(request.path)

    def apply(self, pipe: Any, requests: Iterable[LoraRequest]) -> None:
        """Make exactly ``requests`` active on ``pipe`` (none: LoRA disabled), loading adapters on a miss."""
        weights: dict[str, float] = {}
        for request in requests:
            name = adapter_name(_file_key(request.path))
            weights[name] = weights.get(name, 0.0) + request.weight  # the same file twice: weights add
            self._names[name] = str(request.path)
        for name in weights:
            self._ensure(pipe, name, Path(self._names[name]), keep=set(weights))
        if self._resident:
            self._switch(pipe, weights)
        self.active = list(weights.items())

    def _switch(self, pipe: Any, weights: dict[str, float]) -> None:
        """Per LoRA layer: activate exactly this job's adapters with their weights, or disable the layer.

        What ``pipe.set_adapters`` + ``enable_lora`` / ``disable_lora`` do, minus their walks over every
        module and parameter (requires_grad bookkeeping) that made a switch cost ~25 ms on the demo model.
        A disabled layer returns ``base_layer(x)`` untouched, so no adapter can leak into the next job.
        """
        if self._layers is None:
            self._layers = [module for part in lora_components(pipe) for module in part.modules()
                            if hasattr(module, "set_scale") and hasattr(module, "lora_A")]
        for layer in self._layers:
            present = [name for name in weights if name in layer.lora_A]
            layer._disable_adapters = not present
            if present:
                layer._active_adapter = present
                for name in present:
                    layer.set_scale(name, weights[name])

    def _ensure(self, pipe: Any, name: str, path: Path, keep: set[str]) -> None:
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        state = self.files.get(_file_key(path), path)
        size = sum(t.numel() * t.element_size() for t in state.values())
        self._evict(pipe, keep, incoming=size)
        dtype = pipe.unet.dtype
        # A copy in the pipeline's dtype: diffusers' key conversion must not touch the RAM tier's dict.
        converted = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        try:
            pipe.load_lora_weights(converted, adapter_name=name)
        except Exception as exc:
            self._drop(pipe, name)
            raise FieldError(("body", "loras"), f"LoRA {path.name!r} could not be applied: {exc}") from exc
        self._resident[name] = size
        self._layers = None
        self.adapter_loads += 1
        log.info("LoRA %s loaded as adapter %s (%d resident)", path.name, name, len(self._resident))

    def _evict(self, pipe: Any, keep: set[str], incoming: int) -> None:
        def over() -> bool:
            return (len(self._resident) + 1 > self.max_resident
                    or sum(self._resident.values()) + incoming > self.max_resident_bytes)

        for name in list(self._resident):
            if not over():
                return
            if name not in keep:
                self._drop(pipe, name)
                self._resident.pop(name, None)
                self._layers = None

    def _drop(self, pipe: Any, name: str) -> None:
        self._layers = None
        try:
            pipe.delete_adapters(name)
        except Exception:  # a half-loaded adapter may exist in one component only
            log.debug("adapter %s was not (fully) resident", name, exc_info=True)


def lora_infotext(requests: list[LoraRequest], cache: LoraCache) -> dict[str, object]:
    """``Lora hashes: "name: hash, name2: hash2"`` as the WebUI writes it (no field when no LoRA)."""
    if not requests:
        return {}
    seen: dict[str, str] = {}
    for request in requests:
        seen.setdefault(request.name.replace(":", "").replace(",", ""), cache.short_hash(request))
    return {"Lora hashes": ", ".join(f"{name}: {digest}" for name, digest in seen.items())}
