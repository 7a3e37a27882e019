"""The per-process state of a render worker, built once in the child process.

No module-level globals are created at import: `start_runtime` builds a
`WorkerRuntime` (device, warm pipelines, runner, control threads) and the task reaches
it through `get_runtime()`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from shared.db.session import get_session_factory
from shared.models.registry import default_checkpoint
from shared.models.store_registry import RegistryView, activate
from shared.queueing.fleet import heartbeat_interval
from shared.settings import Settings, worker_process_name
from shared.storage.object_store import get_object_store
from worker.control.beacon import FleetBeacon
from worker.control.job_control import JobControl
from worker.control.lease_keeper import LeaseKeeper
from worker.control.recovery import RecoveryLoop
from worker.control.upscaler_checks import UpscalerChecks
from worker.engine.pipeline_cache import PipelineCache
from worker.model_pull.puller import ModelPuller, ModelPullError
from worker.runner import JobRunner

log = logging.getLogger(__name__)


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
    """The render process: warm pipelines, the job runner, and the control threads beside it. The runner
    and the threads share only a `JobControl`; none of them knows this object."""

    def __init__(self, settings: Settings, time_limit_errors: tuple[type[BaseException], ...] = ()) -> None:
        import torch

        self.device, self.dtype = pick_device(settings.worker.device)
        torch.set_num_threads(torch_threads_for(settings.worker.torch_threads, self.device))
        self.settings = settings
        self.name = worker_process_name(settings, os.getpid())
        self.ready = threading.Event()
        self.control = JobControl()
        session_factory = get_session_factory()
        beat = heartbeat_interval(settings)
        self.beacon = FleetBeacon(self.name, self.describe, settings.services.redis_url, beat)
        self.pipelines = PipelineCache(settings, self.device, self.dtype, on_change=self.beacon.advertise)
        self.puller = self._model_puller(settings, session_factory)
        self.runner = JobRunner(self.name, self.control, self.pipelines, session_factory, get_object_store(),
                                settings, time_limit_errors, puller=self.puller)
        self.lease_keeper = LeaseKeeper(self.control, session_factory, self.name, settings.jobs.lease_seconds, beat)
        self.recovery = RecoveryLoop(session_factory, settings.services.redis_url, beat,
                                     settings.jobs.republish_after_seconds, settings.routing.affinity_max_wait_seconds)
        self.upscaler_checks = UpscalerChecks(settings.models.models_dir, max(beat, 2.0), self.beacon.advertise)

    @staticmethod
    def _model_puller(settings: Settings, session_factory: sessionmaker[Session]) -> ModelPuller | None:
        """With the model store on: this process's lists read its registry, and jobs pull what they lack."""
        if not settings.models.model_store:
            return None
        models = settings.models
        registry = RegistryView.of_database(models.models_dir, session_factory)
        activate(registry)
        return ModelPuller(models.models_dir, get_object_store(), registry, models.model_disk_cache_bytes,
                           models.model_pull_tries, models.model_pull_bytes_per_second)

    def start(self) -> None:
        """Start the control threads, load the configured models, then say so: the first job costs no more
        than the tenth."""
        for thread in (self.lease_keeper, self.beacon, self.recovery):
            thread.start()
        self.warm_up()
        # After warm-up: two threads importing the same packages at once can deadlock in Python's module locks
        # (CI: warm-up's diffusers import failed with _DeadlockError while the checks imported spandrel).
        self.upscaler_checks.start()
        self.beacon.advertise()

    def stop(self) -> None:
        for thread in (self.lease_keeper, self.beacon, self.recovery, self.upscaler_checks):
            thread.stop()

    def warm_up(self) -> None:
        """Load the configured models before taking the first job."""
        names = self.settings.worker.worker_model_names() or [
            default_checkpoint(self.settings.models.models_dir, self.settings.models.default_model)
        ]
        for name in names:
            if name and self._pulled(name):
                self.pipelines.get(name)
        self.ready.set()

    def _pulled(self, checkpoint: str) -> bool:
        """The checkpoint is on disk, pulled from the model store if it had to be; False (logged) when the pull
        failed: the worker starts anyway, and a job for that checkpoint tries again."""
        if self.puller is None:
            return True
        try:
            self.puller.pull(self.puller.missing_checkpoint(checkpoint))
        except ModelPullError as exc:
            log.error("not warming %s: %s", checkpoint, exc)
            return False
        return True

    def describe(self) -> dict[str, Any]:
        job_id = self.control.job_id
        return {
            "name": self.name,
            "pid": os.getpid(),
            "device": self.device,
            "models": self.pipelines.names(),
            "models_on_disk": self.puller.on_disk() if self.puller is not None else [],
            "model_downloads": self.puller.downloads if self.puller is not None else 0,
            "loras": self.pipelines.resident_loras(),
            "controlnets": self.pipelines.controlnets(),
            "upscalers": self.pipelines.upscalers(),
            "upscaler_checks": self.upscaler_checks.report(),
            "memory": memory_report(self.device) | {"models_loaded": self.pipelines.used_bytes(),
                                                     "models_budget": self.pipelines.budget},
            "model_evictions": self.pipelines.evictions,
            "model_loads": self.pipelines.loads,
            "ready": self.ready.is_set(),
            "current_job": str(job_id) if job_id is not None else None,
            "current_batch": [str(job) for job in self.control.job_ids],
            "jobs_done": self.control.jobs_done,
            "images_done": self.control.images_done,
            "busy_seconds": round(self.control.busy_seconds, 3),
        }


_runtime: WorkerRuntime | None = None


def start_runtime(settings: Settings, time_limit_errors: tuple[type[BaseException], ...] = ()) -> WorkerRuntime:
    global _runtime
    _runtime = WorkerRuntime(settings, time_limit_errors)
    _runtime.start()
    log.info("worker %s ready with %s", _runtime.name, _runtime.pipelines.names())
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the worker runtime was not started (worker_process_init did not run)")
    return _runtime


def stop_runtime() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.stop()
        _runtime = None
