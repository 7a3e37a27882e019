"""Warm pipelines on one worker, kept under a memory budget, least recently used evicted first.

One pipeline per checkpoint serves txt2img, img2img, inpainting and hires fix (the engine drives
its UNet, VAE and text encoder directly), so those modes share every weight. Before a load, the
new model's size is estimated from its safetensors headers (no tensor read) and older models are
evicted until it fits; after the load its real size is recorded. The budget is
`RENDERFARM_PIPELINE_CACHE_BYTES` (0: 85% of the GPU's memory, or half the RAM on a CPU worker),
optionally with a count limit (`RENDERFARM_PIPELINE_CACHE_MODELS`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.models.registry import resolve_checkpoint
from shared.settings import Settings
from shared.webui.hashes import HashCache

log = logging.getLogger(__name__)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class LoadedModel:
    name: str
    path: Path
    short_hash: str
    pipeline: Any
    load_seconds: float
    scheduler_config: dict[str, Any]
    nbytes: int = 0
    # The LoRA adapters resident on this pipeline (worker.engine.lora.LoraCache), switched per job.
    loras: Any = field(default=None)


def estimate_checkpoint_bytes(path: Path, float_bytes: int) -> int:
    """Bytes the weights of a checkpoint file (or diffusers folder) take once loaded with floats of `float_bytes`."""
    from shared.models.safetensors_header import read_safetensors_header

    files = _loaded_weight_files(Path(path)) if Path(path).is_dir() else [Path(path)]
    total = 0
    for file in files:
        header = read_safetensors_header(file)
        for key, shape in header.shapes.items():
            numel = 1
            for dim in shape:
                numel *= dim
            dtype = header.dtypes[key]
            total += numel * (float_bytes if dtype in _FLOAT_DTYPES else _DTYPE_BYTES.get(dtype, 4))
    return total


def _loaded_weight_files(folder: Path) -> list[Path]:
    """A diffusers folder's weights as the loader picks them: per component, the plain files, or the
    ``*.fp16.safetensors`` variant only where a component has nothing else."""
    by_component: dict[Path, list[Path]] = {}
    for file in sorted(folder.rglob("*.safetensors")):
        by_component.setdefault(file.parent, []).append(file)
    picked: list[Path] = []
    for files in by_component.values():
        plain = [f for f in files if ".fp16." not in f.name]
        picked += plain or files
    return picked


def pipeline_bytes(pipeline: Any) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules, each tensor counted once."""
    import torch

    seen: set[int] = set()
    total = 0
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def default_budget(device: str) -> int:
    import psutil
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.85)
    return int(psutil.virtual_memory().total * 0.5)


class PipelineCache:
    """Warm pipelines by checkpoint name under a byte budget (and optional count limit), LRU evicted."""

    def __init__(self, settings: Settings, device: str, dtype: Any,
                 on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.budget = settings.worker.pipeline_cache_bytes or default_budget(device)
        self.max_models = settings.worker.pipeline_cache_models
        self.hashes = HashCache.of_models_dir(settings.models.models_dir)
        self.on_change = on_change
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.loads = 0
        self.evictions = 0
        self._lora_files: Any = None  # parsed LoRA files in RAM, shared by every pipeline's LoraCache

    def names(self) -> list[str]:
        return list(self._models)

    def used_bytes(self) -> int:
        return sum(model.nbytes for model in self._models.values())

    def resident_loras(self) -> list[str]:
        """LoRA adapters resident on the loaded pipelines, for the heartbeat and the dashboard."""
        return sorted({name for model in self._models.values() for name in model.loras.resident()})

    def get(self, name: str) -> LoadedModel:
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        ckpt = resolve_checkpoint(self.settings.models.models_dir, name)
        if ckpt.name in self._models:  # asked for by file name or title: the same pipeline
            self._models.move_to_end(ckpt.name)
            return self._models[ckpt.name]
        float_bytes = 2 if str(self.dtype).endswith(("float16", "bfloat16")) else 4
        self._make_room(estimate_checkpoint_bytes(ckpt.path, float_bytes))
        loaded = self._load(ckpt.name, ckpt.path)
        self._models[ckpt.name] = loaded
        self._make_room(0, keep=ckpt.name)
        self._changed()
        return loaded

    def _load(self, name: str, path: Path) -> LoadedModel:
        from worker.engine.checkpoint_loader import load_pipeline
        from worker.engine.lora import LoraCache, StateDictCache

        started = time.perf_counter()
        pipeline = load_pipeline(path, device=self.device, dtype=self.dtype)
        pipeline.set_progress_bar_config(disable=True)
        loaded = LoadedModel(
            name=name, path=path, short_hash=self.hashes.checkpoint(path), pipeline=pipeline,
            load_seconds=time.perf_counter() - started, scheduler_config=dict(pipeline.scheduler.config),
            nbytes=pipeline_bytes(pipeline),
        )
        if self._lora_files is None:
            self._lora_files = StateDictCache()
        loaded.loras = LoraCache(self._lora_files, hashes=self.hashes)
        self.loads += 1
        log.info("loaded %s [%s] on %s in %.2fs (%.0f MB)", name, loaded.short_hash, self.device,
                 loaded.load_seconds, loaded.nbytes / 1e6)
        return loaded

    def _make_room(self, incoming: int, keep: str | None = None) -> None:
        """Evict least recently used models until `incoming` more bytes (and one more model) fit."""
        evicted = False
        while any(name != keep for name in self._models):
            over_budget = self.used_bytes() + incoming > self.budget
            extra = 1 if keep is None else 0
            over_count = self.max_models > 0 and len(self._models) + extra > self.max_models
            if not (over_budget or over_count):
                break
            victim = next(name for name in self._models if name != keep)
            dropped = self._models.pop(victim)
            log.info("evicted %s (%.0f MB) from the pipeline cache", victim, dropped.nbytes / 1e6)
            self.evictions += 1
            evicted = True
            del dropped
        if evicted:
            gc.collect()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # advertising is best effort; the next heartbeat repeats it
                log.warning("could not advertise the pipeline cache", exc_info=True)
