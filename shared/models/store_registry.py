"""The shared model store's registry (issue 19): which model files the farm has, wherever they are.

A file of the store lives in the object store under its SHA-256 (:func:`object_key`), and one row of
``model_files`` names it: its kind, its name inside that kind's WebUI folder, its hashes as the WebUI writes them,
its architecture and safetensors metadata. Files found in a models folder are registered too (``source`` "folder",
``stored`` false until an operator uploads them), so the registry lists everything the farm can render.

Every process that lists or resolves models (the API's lists and submission, the workers' name lookups) sees the
registry through the active :class:`RegistryView`: :func:`registered` gives a models folder's kind folder's files,
local or not, and :func:`record_at` the record of a path the process does not hold (yet). A process without an
active view (unit tests, tools) sees only its folder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared import blocking
from shared.db.models import ModelFile
from shared.errors import FieldError
from shared.models.architecture import checkpoint_architecture
from shared.models.registry import CHECKPOINT_DIR, REFUSED_SUFFIXES
from shared.models.safetensors_header import safetensors_header_or_none, safetensors_problem
from shared.webui.hashes import legacy_model_hash, lora_short_hash, sha256_file

__all__ = [
    "KIND_FOLDERS",
    "ModelRecord",
    "RegistryView",
    "activate",
    "active_view",
    "describe_file",
    "object_key",
    "record_at",
    "registered",
]

# The kinds the store holds, and the WebUI folder each is installed in. An upscaler's name starts with its own
# folder (``ESRGAN/4x-UltraSharp.pth``, ``RealESRGAN/...``: the WebUI names them by folder), so its kind has none.
KIND_FOLDERS: dict[str, str] = {"checkpoint": CHECKPOINT_DIR, "lora": "Lora", "vae": "VAE", "embedding": "embeddings",
                                 "controlnet": "ControlNet", "upscaler": "", "hypernetwork": "hypernetworks"}
# Kinds whose files may be torch pickles: read by their opcodes here, never run, and on a worker only through
# torch's weights-only unpickler (shared/models/upscalers.py).
PICKLE_KINDS = {"upscaler": (".pth", ".pt"), "hypernetwork": (".pt",)}


def object_key(sha256: str) -> str:
    """Where the store keeps a file's bytes: by content, so one file under two names is stored once."""
    return f"models/sha256/{sha256.lower()}"


@dataclass(frozen=True)
class ModelRecord:
    kind: str
    name: str  # path inside the kind's folder, with extension, "/" separated
    sha256: str
    size: int
    short_hash: str
    lora_hash: str | None
    legacy_hash: str | None
    architecture: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    stored: bool = False
    source: str = "upload"
    added_by: str = ""
    added_at: datetime | None = None
    id: int | None = None

    @property
    def relpath(self) -> str:
        """The file's path inside a models folder (``Lora/style.safetensors``)."""
        folder = KIND_FOLDERS[self.kind]
        return f"{folder}/{self.name}" if folder else self.name

    @classmethod
    def of_row(cls, row: ModelFile) -> ModelRecord:
        return cls(kind=row.kind, name=row.name, sha256=row.sha256, size=row.size, short_hash=row.short_hash,
                   lora_hash=row.lora_hash, legacy_hash=row.legacy_hash, architecture=row.architecture,
                   metadata=dict(row.file_metadata or {}), details=dict(row.details or {}), stored=row.stored, source=row.source,
                   added_by=row.added_by, added_at=row.added_at, id=row.id)


def check_name(name: str, field_loc: tuple[str | int, ...] = ("body", "name"), kind: str | None = None) -> str:
    """A file name a store entry of ``kind`` may have: a relative path inside its folder ending in
    ``.safetensors`` (an upscaler: also ``.pth``/``.pt``, inside one of the WebUI's upscaler folders, ``ESRGAN/``
    when it names none); other pickle formats are refused by their name alone, before a byte of them is read."""
    from shared.models.upscalers import UPSCALER_FOLDERS

    name = name.strip()
    parts = Path(name).parts
    if (not name or name.startswith(("/", "\\", ".")) or "\\" in name or "\x00" in name or ".." in parts
            or any(part.startswith(".") for part in parts) or len(name) > 500):
        raise FieldError(field_loc, f"{name!r} is not a file name inside a models folder")
    suffix = Path(name).suffix.lower()
    allowed = (".safetensors", *PICKLE_KINDS.get(kind or "", ()))
    if suffix in REFUSED_SUFFIXES and suffix not in allowed:
        raise FieldError(field_loc, f"{suffix} files are pickles that can run code when loaded; convert it to "
                                    ".safetensors (only .safetensors files are stored)")
    if suffix not in allowed:
        raise FieldError(field_loc, f"{name!r}: only {', '.join(allowed)} files are stored for this kind")
    if kind == "upscaler" and parts[0] not in UPSCALER_FOLDERS:
        if len(parts) > 1:
            raise FieldError(field_loc, f"{name!r}: an upscaler's name starts with its folder, one of "
                                        f"{', '.join(UPSCALER_FOLDERS)} (or none: ESRGAN/)")
        name = f"ESRGAN/{name}"
    return name


def check_kind(kind: str, field_loc: tuple[str | int, ...] = ("body", "kind")) -> str:
    if kind not in KIND_FOLDERS:
        raise FieldError(field_loc, f"kind {kind!r} is not one of {', '.join(KIND_FOLDERS)}")
    return kind


_LORA_MARKERS = ("lora_", "lora.", "hada_", "lokr_", ".alpha", "lora_a", "lora_b")


def kind_mismatch(kind: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why tensors with these names cannot be a file of ``kind`` (a LoRA uploaded as an embedding, ...), or None.
    Lenient on purpose: it catches a file put in the wrong folder, it does not validate the weights."""
    names = [name.lower() for name in shapes]
    if kind == "lora" and not any(marker in name for name in names for marker in _LORA_MARKERS):
        return "no LoRA tensors in it (lora_up/lora_down, lora_A/lora_B, LyCORIS hada_/lokr_): not a LoRA"
    if kind == "embedding" and (len(names) > 4 or any(marker in name for name in names for marker in _LORA_MARKERS)):
        return f"{len(names)} tensors named like a model's, not a textual-inversion embedding's (emb_params, ...)"
    if kind == "vae" and not any(name.startswith(("decoder.", "encoder.", "first_stage_model.")) for name in names):
        return "no encoder./decoder. tensors in it: not a VAE"
    return None


def describe_file(path: Path, kind: str, name: str, *, source: str, added_by: str) -> ModelRecord:
    """Check a file as the registry does before anything is stored (its safetensors header, and a checkpoint's
    architecture), then hash it as the WebUI does. Raises FieldError naming ``file`` when it is refused."""
    pickled = Path(name).suffix.lower() in PICKLE_KINDS.get(kind, ())
    if pickled:
        from shared.models.upscalers import pickle_problem

        problem = pickle_problem(path)
    else:
        problem = safetensors_problem(path)
    if problem is not None:
        raise FieldError(("body", "file"), f"{name}: {problem}")
    architecture = checkpoint_architecture(path) if kind == "checkpoint" else None
    if kind == "checkpoint" and architecture is None:
        raise FieldError(("body", "file"), f"{name}: not a checkpoint this farm renders (SD1.5 or SDXL)")
    header = None if pickled else safetensors_header_or_none(path)
    details: dict[str, Any] = {}
    if kind == "controlnet":
        from shared.controlnet.models import detect_controlnet

        detection = detect_controlnet(header, Path(name).name) if header is not None else None
        if detection is None or detection.problem is not None:
            raise FieldError(("body", "file"), detection.problem if detection and detection.problem
                             else f"{name}: not a readable .safetensors file")
        architecture, details = detection.architecture, {"layout": detection.layout}
    elif header is not None and kind not in ("checkpoint", "upscaler", "hypernetwork"):
        mismatch = kind_mismatch(kind, header.shapes)
        if mismatch is not None:
            raise FieldError(("body", "file"), f"{name}: {mismatch}")
        if kind == "embedding" and header.shapes:  # the WebUI API lists its vectors and width
            details = {"shape": list(next(iter(header.shapes.values())))}
    metadata = {k: v for k, v in (header.metadata if header is not None else {}).items() if isinstance(v, str)}
    sha = sha256_file(path)
    return ModelRecord(
        kind=kind, name=name, sha256=sha, size=path.stat().st_size, short_hash=sha[:10],
        lora_hash=lora_short_hash(path) if kind == "lora" else None,
        legacy_hash=legacy_model_hash(path) if kind in ("checkpoint", "controlnet") else None,
        architecture=architecture, metadata=metadata, details=details, stored=False, source=source, added_by=added_by,
    )


# --- what every process sees ----------------------------------------------------------------------------------


class RegistryView:
    """The registry as one process sees it: read from Postgres at most every ``ttl`` seconds, and at once after
    this process changed it (:meth:`invalidate`). ``models_dir`` is the folder the records are installed in."""

    def __init__(self, models_dir: Path, read: Callable[[], Iterable[ModelRecord]], ttl: float = 1.0) -> None:
        self.models_dir = Path(models_dir).resolve()
        self._read = read
        self._ttl = ttl
        self._lock = threading.Lock()
        self._records: dict[str, ModelRecord] = {}
        self._read_at = float("-inf")

    @classmethod
    def of_database(cls, models_dir: Path, session_factory: Callable[[], Session], ttl: float = 1.0
                    ) -> RegistryView:
        def read() -> list[ModelRecord]:
            with session_factory() as session:
                return list_records(session)

        return cls(models_dir, read, ttl)

    def invalidate(self) -> None:
        with self._lock:
            self._read_at = float("-inf")

    def records(self) -> dict[str, ModelRecord]:
        """Every record by its path inside the models folder."""
        with self._lock:
            if time.monotonic() - self._read_at < self._ttl:
                return self._records
        blocking.check("reading the model store's registry")
        fresh = {record.relpath: record for record in self._read()}
        with self._lock:
            self._records, self._read_at = fresh, time.monotonic()
        return fresh


_active: RegistryView | None = None


def activate(view: RegistryView | None) -> None:
    """Make ``view`` the registry this process's model lists and look-ups read (None: the folder alone)."""
    global _active
    _active = view


def active_view() -> RegistryView | None:
    return _active


def registered(models_dir: Path, folder: str) -> dict[str, ModelRecord]:
    """The registry's files of one kind folder (``Lora``...) by name inside it, when ``models_dir`` is the folder
    the active view serves; empty otherwise."""
    view = _active
    if view is None or Path(models_dir).resolve() != view.models_dir:
        return {}
    prefix = folder + "/"
    return {relpath[len(prefix):]: record for relpath, record in view.records().items() if relpath.startswith(prefix)}


def refresh_for(models_dir: Path) -> bool:
    """Make the next read of the active view go to Postgres, when it serves ``models_dir``: a name that is not
    found may have been added by another process within the view's last second. Whether there is such a view."""
    view = _active
    if view is None or Path(models_dir).resolve() != view.models_dir:
        return False
    view.invalidate()
    return True


def record_at(path: Path | str) -> ModelRecord | None:
    """The registry's record of a file path inside the active view's models folder (used where the file is not on
    this machine: its hashes and architecture come from the record)."""
    view = _active
    if view is None:
        return None
    try:
        relpath = Path(path).resolve().relative_to(view.models_dir).as_posix()
    except ValueError:
        return None
    return view.records().get(relpath)


# --- the table ------------------------------------------------------------------------------------------------


def list_records(session: Session, kind: str | None = None) -> list[ModelRecord]:
    query = select(ModelFile).order_by(ModelFile.kind, ModelFile.name)
    if kind is not None:
        query = query.where(ModelFile.kind == kind)
    return [ModelRecord.of_row(row) for row in session.scalars(query)]


def find_row(session: Session, kind: str, name: str) -> ModelFile | None:
    return session.scalar(select(ModelFile).where(ModelFile.kind == kind, ModelFile.name == name))


class NameTakenError(ValueError):
    """Another file is registered under this kind and name."""


def register(session: Session, record: ModelRecord) -> ModelFile:
    """Add ``record`` to the registry, or mark an existing entry with the same bytes as stored. A different file
    under the same kind and name is a :class:`NameTakenError` (delete or rename the old one first)."""
    row = find_row(session, record.kind, record.name)
    if row is not None:
        if row.sha256 != record.sha256:
            raise NameTakenError(f"{record.kind} {record.name!r} is already registered with another file "
                                 f"(sha256 {row.sha256[:12]}); rename or delete it first")
        row.stored = row.stored or record.stored
        return row
    # ON CONFLICT: several API processes register one folder at start; one insert wins, the others find its row.
    session.execute(insert(ModelFile).values(
        kind=record.kind, name=record.name, sha256=record.sha256, size=record.size, short_hash=record.short_hash,
        lora_hash=record.lora_hash, legacy_hash=record.legacy_hash, architecture=record.architecture,
        file_metadata=record.metadata, details=record.details, stored=record.stored, source=record.source, added_by=record.added_by,
    ).on_conflict_do_nothing(index_elements=[ModelFile.kind, ModelFile.name]))
    row = find_row(session, record.kind, record.name)
    assert row is not None
    if row.sha256 != record.sha256:
        raise NameTakenError(f"{record.kind} {record.name!r} was just registered with another file "
                             f"(sha256 {row.sha256[:12]})")
    return row


def sha_still_used(session: Session, sha256: str, except_id: int) -> bool:
    """Whether another entry names the same bytes (the stored object must then stay)."""
    return session.scalar(select(ModelFile.id).where(ModelFile.sha256 == sha256, ModelFile.id != except_id)
                          .limit(1)) is not None
