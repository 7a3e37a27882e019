"""The per-process state of a render worker, built once in the child process.

No module-level globals are created at import: `start_runtime` builds a
`WorkerRuntime` (device, warm pipelines, heartbeat, runner) and the task reaches
it through `get_runtime()`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.db.session import get_session_factory
from shared.hashes import HashCache
from shared.model_registry import default_checkpoint, resolve_checkpoint
from shared.object_store import get_object_store
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    path: Path
    short_hash: str
    pipeline: Any
    load_seconds: float
    scheduler_config: dict[str, Any]
    # The LoRA adapters resident on this pipeline (worker.pipelines.lora.LoraCache), switched per job.
    loras: Any = field(default=None)


class PipelineCache:
    """Warm pipelines by checkpoint name, least recently used evicted beyond `capacity`."""

    def __init__(self, settings: Settings, device: str, dtype: Any, capacity: int = 2) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.hashes = HashCache(settings.models_dir / ".hashes.json")
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.loads = 0
        self._lora_files: Any = None  # parsed LoRA files in RAM, shared by every pipeline's LoraCache

    def names(self) -> list[str]:
        return list(self._models)

    def resident_loras(self) -> list[str]:
        """LoRA adapters resident on the loaded pipelines, for the heartbeat and the dashboard."""
        return sorted({name for model in self._models.values() for name in model.loras.resident()})

    def get(self, name: str) -> LoadedModel:
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        from worker.pipelines.checkpoint_loader import load_pipeline
        from worker.pipelines.lora import LoraCache, StateDictCache

        ckpt = resolve_checkpoint(self.settings.models_dir, name)
        started = time.perf_counter()
        pipeline = load_pipeline(ckpt.path, device=self.device, dtype=self.dtype)
        pipeline.set_progress_bar_config(disable=True)
        loaded = LoadedModel(
            name=ckpt.name,
            path=ckpt.path,
            short_hash=self.hashes.checkpoint(ckpt.path),
            pipeline=pipeline,
            load_seconds=time.perf_counter() - started,
            scheduler_config=dict(pipeline.scheduler.config),
        )
        if self._lora_files is None:
            self._lora_files = StateDictCache()
        loaded.loras = LoraCache(self._lora_files, hashes=self.hashes)
        self.loads += 1
        log.info("loaded %s [%s] on %s in %.2fs", ckpt.name, loaded.short_hash, self.device, loaded.load_seconds)
        self._models[name] = loaded
        while len(self._models) > self.capacity:
            evicted, _ = self._models.popitem(last=False)
            log.info("evicted %s from the pipeline cache", evicted)
        return loaded


def pick_device(requested: str) -> tuple[str, Any]:
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if requested.startswith("cuda") else torch.float32
    return requested, dtype


def memory_report(device: str) -> dict[str, int]:
    """Bytes, for the heartbeat: this process's resident set and the device's free/total memory
    (system RAM for a CPU worker), so operators see how much room a worker has for more models."""
    import psutil
    import torch

    report = {"process_rss": psutil.Process().memory_info().rss}
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
    else:
        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
    report |= {"device_free": int(free), "device_total": int(total)}
    return report


def torch_threads_for(configured: int, device: str) -> int:
    """CPU renders oversubscribe badly when torch threads compete with other processes; keep half the cores."""
    if configured > 0:
        return configured
    import torch

    if device.startswith("cuda"):
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 2) // 2)


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        import torch

        self.device, self.dtype = pick_device(settings.device)
        torch.set_num_threads(torch_threads_for(settings.torch_threads, self.device))
        self.settings = settings
        # One name per process: a lease names the exact process that holds it.
        self.name = f"{settings.worker_name or socket.gethostname()}:{os.getpid()}"
        self.pipelines = PipelineCache(settings, self.device, self.dtype)
        from worker.heartbeat import Heartbeat
        from worker.runner import JobRunner

        self.heartbeat = Heartbeat(self, get_session_factory(), settings)
        self.runner = JobRunner(self, get_session_factory(), get_object_store(), settings)
        self.ready = threading.Event()
        self.jobs_done = 0

    def warm_up(self) -> None:
        """Load the configured models before taking the first job."""
        names = self.settings.worker_model_names() or [
            default_checkpoint(self.settings.models_dir, self.settings.default_model)
        ]
        for name in names:
            if name:
                self.pipelines.get(name)
        self.ready.set()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "device": self.device,
            "models": self.pipelines.names(),
            "loras": self.pipelines.resident_loras(),
            "memory": memory_report(self.device),
            "model_loads": self.pipelines.loads,
            "ready": self.ready.is_set(),
            "current_job": self.heartbeat.current_job_id,
            "jobs_done": self.jobs_done,
        }


_runtime: WorkerRuntime | None = None


def start_runtime(settings: Settings) -> WorkerRuntime:
    global _runtime
    _runtime = WorkerRuntime(settings)
    _runtime.heartbeat.start()
    _runtime.warm_up()
    _runtime.heartbeat.beat()
    log.info("worker %s ready with %s", _runtime.name, _runtime.pipelines.names())
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the worker runtime was not started (worker_process_init did not run)")
    return _runtime


def stop_runtime() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.heartbeat.stop()
        _runtime = None
