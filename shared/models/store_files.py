"""Adding, renaming and deleting the shared model store's files, and registering a models folder (issue 19).

One place for what the upload route, the folder registration (``POST /v1/models/refresh``, ``renderfarm-admin
models register``) and the tests do: a file is checked and hashed before a byte of it is stored
(:func:`shared.models.store_registry.describe_file`), stored once per content, then registered; the registry view
of this process is refreshed at once so its lists show the change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db.models import ModelFile
from shared.errors import FieldError
from shared.models.registry import is_diffusers_folder
from shared.models.store_registry import (
    KIND_FOLDERS,
    ModelRecord,
    NameTakenError,
    active_view,
    check_name,
    describe_file,
    find_row,
    object_key,
    register,
    sha_still_used,
)
from shared.storage.base import ObjectStore
from shared.webui.hashes import HashCache

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/octet-stream"


def _refreshed() -> None:
    view = active_view()
    if view is not None:
        view.invalidate()


def add_file(session: Session, store: ObjectStore | None, path: Path, kind: str, name: str, *, source: str,
             added_by: str) -> tuple[ModelRecord, bool]:
    """Check, hash, store (when ``store`` is given) and register the file at ``path``; commits. Returns the record
    and whether it is new. Raises FieldError (refused file) or NameTakenError (another file has that name)."""
    record = describe_file(path, kind, name, source=source, added_by=added_by)
    existing = find_row(session, kind, name)
    if existing is not None and existing.sha256 != record.sha256:
        raise NameTakenError(f"{kind} {name!r} is already registered with another file "
                             f"(sha256 {existing.sha256[:12]}); rename or delete it first")
    if store is not None:
        if not store.exists(object_key(record.sha256)):
            store.put_file(object_key(record.sha256), path, CONTENT_TYPE)
        record = ModelRecord(**{**record.__dict__, "stored": True})
    row = register(session, record)
    session.commit()
    _refreshed()
    return ModelRecord.of_row(row), existing is None


def rename_file(session: Session, row: ModelFile, new_name: str) -> ModelRecord:
    """Give an entry another name inside its folder; commits. Workers that pulled it under the old name pull it
    again under the new one (the bytes are stored by content, so nothing is uploaded again)."""
    name = check_name(new_name, kind=row.kind)
    if find_row(session, row.kind, name) is not None:
        raise NameTakenError(f"{row.kind} {name!r} is already registered")
    row.name = name
    session.commit()
    _refreshed()
    return ModelRecord.of_row(row)


def delete_file(session: Session, store: ObjectStore, row: ModelFile) -> None:
    """Remove an entry; its stored bytes go too unless another entry names the same content. Commits first, so
    a failed delete of the bytes leaves an unreferenced object, never an entry without its bytes."""
    sha, kept = row.sha256, sha_still_used(session, row.sha256, row.id)
    session.delete(row)
    session.commit()
    _refreshed()
    if not kept:
        store.delete(object_key(sha))


@contextlib.contextmanager
def one_registration(session_factory: Callable[[], Session], models_dir: Path) -> Iterator[bool]:
    """Whether this process is the one registering ``models_dir`` now (a session-level advisory lock held for the
    block): several API processes start at once, and one hashing pass over a large folder is enough."""
    with session_factory() as session:
        key = func.hashtext(f"model-store-register:{Path(models_dir).resolve()}")
        got = bool(session.scalar(select(func.pg_try_advisory_lock(key))))
        try:
            yield got
        finally:
            if got:
                session.execute(select(func.pg_advisory_unlock(key)))
            session.commit()


def _folder_files(models_dir: Path) -> Iterator[tuple[str, Path, str]]:
    """(kind, file, name) of every single file the store could hold in a models folder's kind folders."""
    from shared.models.upscalers import SUFFIXES as UPSCALER_SUFFIXES
    from shared.models.upscalers import UPSCALER_FOLDERS

    for kind, folder in KIND_FOLDERS.items():
        roots = [(Path(models_dir) / name, name + "/") for name in UPSCALER_FOLDERS] if kind == "upscaler" else \
            [(Path(models_dir) / folder, "")]
        suffixes = {"upscaler": UPSCALER_SUFFIXES, "hypernetwork": (".pt", ".safetensors")}.get(kind, (".safetensors",))
        for root, prefix in roots:
            if not root.is_dir():
                continue
            for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
                if any(is_diffusers_folder(parent) for parent in path.parents if parent.is_relative_to(root)):
                    continue  # a part of a diffusers folder, which is not stored (single files only)
                if kind == "controlnet" and path.relative_to(root).parts[0] == "annotators":
                    continue  # the preprocessors' weights, not ControlNets
                yield kind, path, prefix + path.relative_to(root).as_posix()


def register_folder(session_factory: Callable[[], Session], models_dir: Path, store: ObjectStore | None,
                    added_by: str = "folder") -> dict[str, int]:
    """Register every loadable single file of a models folder's kind folders (and upload it when ``store`` is
    given). A name already registered with other bytes is left as it is and logged; refused files are skipped
    (the lists show them with their reason). Returns counts: registered, skipped."""
    counts = {"registered": 0, "skipped": 0}
    hashes = HashCache.of_models_dir(Path(models_dir))
    for kind, path, name in _folder_files(models_dir):
        with session_factory() as session:
            known = find_row(session, kind, name)
            if known is not None and known.sha256 == hashes.sha256(path) and (known.stored or store is None):
                counts["registered"] += 1
                continue
            try:
                check_name(name, kind=kind)
                add_file(session, store, path, kind, name, source="folder", added_by=added_by)
                counts["registered"] += 1
            except (FieldError, NameTakenError) as exc:
                log.warning("models folder: %s not registered: %s", path, exc)
                counts["skipped"] += 1
    return counts
