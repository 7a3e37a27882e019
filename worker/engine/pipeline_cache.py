"""Warm pipelines on one worker, kept under a memory budget, least recently used evicted first.

One pipeline per checkpoint serves txt2img, img2img, inpainting and hires fix (the engine drives
its UNet, VAE and text encoder directly), so those modes share every weight. ControlNets are held in
the same budget and the same least-recently-used order, on the device and in the dtype of the
pipelines (:meth:`PipelineCache.controlnet`). Before a load, the
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
from collections.abc import Callable, Collection
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


@dataclass
class LoadedControlNet:
    location: str  # relative to the models root's parent, as a job's unit names it
    title: str
    model: Any
    nbytes: int


@dataclass
class HeldUpscaler:
    location: str  # relative to the models folder, as a job's contract names it
    upscaler: Any  # worker.engine.upscalers.LoadedUpscaler
    nbytes: int


_CONTROLNET = "controlnet:"  # key prefix of ControlNets in the cache's one LRU order
_UPSCALER = "upscaler:"  # ...and of upscaler models
_FACE_RESTORER = "face-restorer:GFPGAN"  # ...and the face restorer (GFPGAN with its detector and face parser)


@dataclass
class HeldFaceRestorer:
    restorer: Any  # worker.engine.face_restoration.FaceRestorer
    nbytes: int


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
        self._models: OrderedDict[str, LoadedModel | LoadedControlNet] = OrderedDict()
        self.loads = 0
        self.evictions = 0
        self._lora_files: Any = None  # parsed LoRA files in RAM, shared by every pipeline's LoraCache

    def _pipelines(self) -> list[LoadedModel]:
        return [model for model in self._models.values() if isinstance(model, LoadedModel)]

    def names(self) -> list[str]:
        """The checkpoints held warm (what routing and the heartbeat advertise)."""
        return [model.name for model in self._pipelines()]

    def controlnets(self) -> list[str]:
        """Titles of the ControlNets held, for the heartbeat and the dashboard."""
        return [model.title for model in self._models.values() if isinstance(model, LoadedControlNet)]

    def upscalers(self) -> list[str]:
        """Files of the upscaler models held (relative to the models folder), for the heartbeat and the dashboard."""
        return [model.location for model in self._models.values() if isinstance(model, HeldUpscaler)]

    def used_bytes(self) -> int:
        return sum(model.nbytes for model in self._models.values())

    def resident_loras(self) -> list[str]:
        """LoRA adapters resident on the loaded pipelines, for the heartbeat and the dashboard."""
        return sorted({name for model in self._pipelines() for name in model.loras.resident()})

    def controlnet(self, location: str, title: str = "") -> Any:
        """The ControlNet at ``location`` (relative to the models root's parent), loaded on first use."""
        from shared.models.architecture import UnsupportedCheckpointError
        from worker.engine.controlnet_loader import load_controlnet

        key = _CONTROLNET + location
        held = self._models.get(key)
        if isinstance(held, LoadedControlNet):
            self._models.move_to_end(key)
            return held.model
        from shared.controlnet.models import controlnet_path

        root = self.settings.models.models_dir.resolve().parent
        path = controlnet_path(self.settings.models.models_dir.resolve(), location).resolve()
        if not path.is_relative_to(root) or not path.exists():
            raise UnsupportedCheckpointError(f"ControlNet {location!r} is not installed on this worker")
        float_bytes = 2 if str(self.dtype).endswith(("float16", "bfloat16")) else 4
        weights = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
        # The pipeline used last is the one rendering this ControlNet's job: it stays.
        last = next((n for n in reversed(self._models) if isinstance(self._models[n], LoadedModel)), None)
        current = {last} if last is not None else set()
        self._make_room(estimate_checkpoint_bytes(weights, float_bytes), keep=current)
        started = time.perf_counter()
        model = load_controlnet(path, self.device, self.dtype)
        nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        self._models[key] = LoadedControlNet(location, title or location, model, nbytes)
        self._make_room(0, keep={key, *current})
        self.loads += 1
        log.info("loaded ControlNet %s on %s in %.2fs (%.0f MB)", title or location, self.device,
                 time.perf_counter() - started, nbytes / 1e6)
        self._changed()
        return model

    def upscaler(self, location: str) -> Any:
        """The upscaler model at ``location`` (relative to the models folder), loaded on first use and held under
        the same budget; raises ``worker.engine.upscalers.UpscalerRefused`` for a file it cannot use."""
        from worker.engine.upscalers import UpscalerRefused, load_upscaler

        key = _UPSCALER + location
        held = self._models.get(key)
        if isinstance(held, HeldUpscaler):
            self._models.move_to_end(key)
            return held.upscaler
        root = self.settings.models.models_dir.resolve()
        path = (root / location).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise UpscalerRefused(f"upscaler {location!r} is not installed on this worker")
        last = next((n for n in reversed(self._models) if isinstance(self._models[n], LoadedModel)), None)
        current = {last} if last is not None else set()
        self._make_room(path.stat().st_size, keep=current)
        started = time.perf_counter()
        upscaler = load_upscaler(path, self.device)
        self._models[key] = HeldUpscaler(location, upscaler, upscaler.size_bytes)
        self._make_room(0, keep={key, *current})
        self.loads += 1
        log.info("loaded upscaler %s (%s x%d) on %s in %.2fs (%.0f MB)", location, upscaler.architecture,
                 upscaler.scale, self.device, time.perf_counter() - started, upscaler.size_bytes / 1e6)
        self._changed()
        return upscaler

    def face_restorer(self) -> Any:
        """GFPGAN with its face detector and parser (``models/GFPGAN/``), loaded on first use and held under the
        same budget; raises ``worker.engine.face_restoration.FaceRestorationUnavailable`` naming what is wrong."""
        from worker.engine.face_restoration import load_face_restorer

        held = self._models.get(_FACE_RESTORER)
        if isinstance(held, HeldFaceRestorer):
            self._models.move_to_end(_FACE_RESTORER)
            return held.restorer
        last = next((n for n in reversed(self._models) if isinstance(self._models[n], LoadedModel)), None)
        current = {last} if last is not None else set()
        started = time.perf_counter()
        restorer = load_face_restorer(self.settings.models.models_dir, self.device)
        nbytes = sum(t.numel() * t.element_size() for module in (restorer.gfpgan, restorer.detector, restorer.parser)
                     for t in [*module.parameters(), *module.buffers()])
        self._models[_FACE_RESTORER] = HeldFaceRestorer(restorer, nbytes)
        self._make_room(0, keep={_FACE_RESTORER, *current})
        self.loads += 1
        log.info("loaded the face restorer on %s in %.2fs (%.0f MB)", self.device, time.perf_counter() - started,
                 nbytes / 1e6)
        self._changed()
        return restorer

    def get(self, name: str) -> LoadedModel:
        held = self._models.get(name)
        if isinstance(held, LoadedModel):
            self._models.move_to_end(name)
            return held
        ckpt = resolve_checkpoint(self.settings.models.models_dir, name)
        held = self._models.get(ckpt.name)
        if isinstance(held, LoadedModel):  # asked for by file name or title: the same pipeline
            self._models.move_to_end(ckpt.name)
            return held
        float_bytes = 2 if str(self.dtype).endswith(("float16", "bfloat16")) else 4
        self._make_room(estimate_checkpoint_bytes(ckpt.path, float_bytes), adding_pipeline=True)
        loaded = self._load(ckpt.name, ckpt.path)
        self._models[ckpt.name] = loaded
        self._make_room(0, keep={ckpt.name})
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

    def _make_room(self, incoming: int, keep: Collection[str] = (), adding_pipeline: bool = False) -> None:
        """Evict least recently used models until `incoming` more bytes fit (and, when `adding_pipeline`, one more
        pipeline under the count limit, which counts pipelines only). Models named in `keep` stay."""
        evicted = False
        while True:
            over_budget = self.used_bytes() + incoming > self.budget
            over_count = self.max_models > 0 and len(self._pipelines()) + int(adding_pipeline) > self.max_models
            if not (over_budget or over_count):
                break
            victims = [name for name, model in self._models.items()
                       if name not in keep and (over_budget or isinstance(model, LoadedModel))]
            if not victims:
                break
            victim = victims[0]
            dropped = self._models.pop(victim)
            log.info("evicted %s (%.0f MB) from the pipeline cache",
                     victim.removeprefix(_CONTROLNET).removeprefix(_UPSCALER),
                     dropped.nbytes / 1e6)
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
