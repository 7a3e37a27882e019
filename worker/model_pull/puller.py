"""What a batch needs from the shared model store, pulled before it renders (issue 19).

A job names its checkpoint, VAE and LoRAs (the files its params recorded at submission) and, as in the WebUI,
embeddings by their names in its prompts. Each that this worker's models folder lacks, and that the model
store's registry knows, is downloaded by hash into the folder (:class:`~worker.model_pull.disk_cache.PulledFiles`:
verified, atomic, one download per file however many ask, least recently used evicted under the byte budget).
A pull that keeps failing (the store is down, the bytes are not the registered file) ends in
:class:`ModelPullError`, which names the file.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from shared.controlnet.models import controlnet_relpath
from shared.jobs.contract import JobSpec, RenderSpec, UpscaleSpec
from shared.models.store_registry import ModelRecord, RegistryView, object_key
from shared.storage.base import ObjectNotFoundError, ObjectStore, StorageError
from worker.model_pull.disk_cache import HashMismatchError, PulledFiles

log = logging.getLogger(__name__)

RETRY_PAUSE_SECONDS = 0.5


class ModelPullError(RuntimeError):
    """A file a job needs could not be pulled; the message names it, ``relpath`` is it."""

    def __init__(self, relpath: str, message: str) -> None:
        super().__init__(message)
        self.relpath = relpath


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _prompts(spec: RenderSpec) -> str:
    return "\n".join((spec.prompt, spec.negative_prompt, spec.hr_prompt, spec.hr_negative_prompt))


def needed_records(specs: Iterable[JobSpec], records: dict[str, ModelRecord]
                   ) -> list[ModelRecord]:
    """The registry's records of every file the specs use: checkpoint, VAE, LoRAs, ControlNets, upscalers, the
    hypernetworks their ``<hypernet:...>`` tags name, and the embeddings whose names appear in their prompts
    (``records`` by path inside the models folder)."""
    by_kind: dict[str, dict[str, ModelRecord]] = {}
    for record in records.values():
        by_kind.setdefault(record.kind, {})[record.name] = record
    wanted: dict[str, ModelRecord] = {}

    def want(relpath: str | None) -> None:
        if relpath is not None and relpath in records:
            wanted[relpath] = records[relpath]

    renders = []
    for spec in specs:
        if isinstance(spec, UpscaleSpec):
            want(spec.upscaler_1_file)
            want(spec.upscaler_2_file)
            continue
        if not isinstance(spec, RenderSpec):  # a training: its base checkpoint, and the file it goes on from
            wanted.update({r.relpath: r for name, r in by_kind.get("checkpoint", {}).items()
                           if spec.model in (name, _stem(name))})
            want(spec.start_from)
            continue
        renders.append(spec)
        for name, record in by_kind.get("checkpoint", {}).items():
            if spec.model in (name, _stem(name)):
                wanted[record.relpath] = record
        named = [("vae", spec.vae)] if spec.vae else []
        for kind, file in [*named, *(("lora", lora.file) for lora in spec.loras)]:
            found = by_kind.get(kind, {}).get(file)
            if found is not None:
                wanted[found.relpath] = found
        for unit in spec.controlnet:
            want(controlnet_relpath(unit.model_location))
        want(spec.hr_upscaler_file)
    text = "\n".join(_prompts(spec) for spec in renders)
    named_hypernets = set(re.findall(r"<hypernet:([^:>]+)", text))
    for name, record in by_kind.get("hypernetwork", {}).items():
        if Path(_stem(name)).name in named_hypernets or _stem(name) in named_hypernets:
            wanted[record.relpath] = record
    for name, record in by_kind.get("embedding", {}).items():
        if re.search(rf"(?<![\w-]){re.escape(Path(_stem(name)).name)}(?![\w-])", text):
            wanted[record.relpath] = record
    return list(wanted.values())


class ModelPuller:
    """Pulls a batch's missing model files from the store into this worker's models folder."""

    def __init__(self, models_dir: Path, store: ObjectStore, registry: RegistryView, budget_bytes: int,
                 tries: int, bytes_per_second: int = 0) -> None:
        self.models_dir = Path(models_dir)
        self.store = store
        self.registry = registry
        self.files = PulledFiles(self.models_dir, budget_bytes)
        self.tries = tries
        self.bytes_per_second = bytes_per_second
        self.downloads = 0  # files this process downloaded (the heartbeat shows it)

    def needed(self, specs: Iterable[JobSpec]) -> list[list[ModelRecord]]:
        """The registry's records of the files each spec uses, read afresh; those this folder pulled before count
        as used now (the least recently used go first when the disk budget needs room)."""
        self.registry.invalidate()  # one read per batch: a file uploaded a moment ago must be found
        records = self.registry.records()
        each = [needed_records([spec], records) for spec in specs]
        self.files.touch(record.relpath for found in each for record in found)
        return each

    def missing(self, records: Iterable[ModelRecord]) -> list[ModelRecord]:
        """Those of ``records`` this folder lacks: not there at all, or a pulled copy of other bytes (the entry
        was replaced). An operator's own file under the name is used as it is."""
        pulled = self.files.pulled()
        found = []
        for record in records:
            here = (self.models_dir / record.relpath).exists()
            if here and (record.relpath not in pulled or pulled[record.relpath] == record.sha256):
                continue
            found.append(record)
        return found

    def missing_checkpoint(self, name: str) -> list[ModelRecord]:
        """The registry's record of checkpoint ``name`` when this folder lacks it (warming a worker up)."""
        for record in self.registry.records().values():
            if record.kind == "checkpoint" and name in (record.name, _stem(record.name)):
                return [] if (self.models_dir / record.relpath).exists() else [record]
        return []

    def pull(self, records: list[ModelRecord], on_start: Callable[[], None] = lambda: None,
             keep: Iterable[str] = ()) -> int:
        """Download each record (``on_start`` runs once, before the first download); the files of one call, and
        those named in ``keep`` (the rest of what the batch uses), are never evicted to make room. Returns how
        many were downloaded. Raises ModelPullError naming the file."""
        pinned = [record.relpath for record in records] + list(keep)
        downloaded = 0
        for i, record in enumerate(records):
            if not record.stored:
                raise ModelPullError(record.relpath, f"{record.relpath} was registered from another machine's models "
                                     "folder and never uploaded to the model store (renderfarm-admin models register "
                                     "--upload)")
            if i == 0:
                on_start()
            downloaded += self._pull_one(record, pinned)
        self.downloads += downloaded
        return downloaded

    def _pull_one(self, record: ModelRecord, pinned: list[str]) -> int:
        def download(part: Path) -> None:
            self.store.get_file(object_key(record.sha256), part, self._pace())

        problem = ""
        for attempt in range(1, self.tries + 1):
            try:
                began = time.monotonic()
                if self.files.ensure(record.relpath, record.sha256, record.size, download, pinned):
                    log.info("pulled %s (%d bytes) in %.2f s", record.relpath, record.size, time.monotonic() - began)
                    return 1
                return 0
            except (HashMismatchError, ObjectNotFoundError) as exc:
                problem = str(exc)
            except (StorageError, OSError) as exc:
                problem = f"the model store failed: {exc}"
            log.warning("pulling %s, try %d of %d: %s", record.relpath, attempt, self.tries, problem)
            if attempt < self.tries:
                time.sleep(RETRY_PAUSE_SECONDS * attempt)
        raise ModelPullError(record.relpath, f"could not pull {record.relpath} (sha256 {record.sha256[:12]}) from the "
                                             f"model store after {self.tries} tries: {problem}")

    def _pace(self) -> Callable[[int], None] | None:
        """A callback that holds a download to ``bytes_per_second`` (None: no cap)."""
        rate = self.bytes_per_second
        if rate <= 0:
            return None
        began, seen = time.monotonic(), [0]
        lock = threading.Lock()  # S3 downloads call back from several transfer threads

        def pace(count: int) -> None:
            with lock:
                seen[0] += count
                ahead = seen[0] / rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)

        return pace

    def on_disk(self) -> list[str]:
        """The checkpoints this worker holds on disk, pulled ones included (routing prefers them after memory)."""
        from shared.models.registry import scan_checkpoints

        return [c.name for c in scan_checkpoints(self.models_dir) if c.loadable and c.path.exists()]
