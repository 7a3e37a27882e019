"""Model files pulled from the store into a worker's models folder: verified, atomic, shared, evicted by age.

The files land where the loaders already look (``<models_dir>/Lora/x.safetensors``), so nothing downstream
knows they were pulled. What this module owns lives under ``<models_dir>/.pulled/``:

- ``index.json``: the files it installed (path inside the folder, sha256, size, last use); the operator's own
  files are never in it, so they are never evicted or replaced;
- ``index.lock``: a file lock around every read-modify-write of the index (several worker processes may share
  one folder);
- ``locks/<sha256>.lock``: one lock per file being pulled, so concurrent pulls of one file share one download
  (the second waits, then finds the file there);
- ``partial/``: downloads in flight. A download is hashed as it lands, moved into place with ``os.replace``
  only when its hash matches, and removed when it fails, so a partial file is never visible under the name.

``budget_bytes`` caps what the pulled files may take (0 or less: no cap); the least recently used pulled
files are removed to make room, never the ones the current batch needs (``pinned``) nor the one just
installed. A file larger than the whole budget is still installed: a job that needs it must be able to run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HASH_CHUNK_BYTES = 8 * 1024 * 1024


class HashMismatchError(RuntimeError):
    """The bytes downloaded for a file are not the ones registered for it."""

    def __init__(self, relpath: str, expected: str, got: str) -> None:
        super().__init__(f"{relpath}: the model store's copy has sha256 {got[:12]}, the registry expects "
                         f"{expected[:12]}; the download was discarded")
        self.relpath = relpath
        self.expected = expected
        self.got = got


@dataclass
class PulledEntry:
    sha256: str
    size: int
    used: float  # time.time() of the last ensure() that wanted it


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class PulledFiles:
    """The pulled files of one models folder (see the module doc)."""

    def __init__(self, models_dir: Path, budget_bytes: int) -> None:
        self.models_dir = Path(models_dir)
        self.budget_bytes = budget_bytes
        self.root = self.models_dir / ".pulled"

    # -- the index ------------------------------------------------------------------------------------------

    def _read(self) -> dict[str, PulledEntry]:
        try:
            raw = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {}
        except ValueError:  # a torn or hand-edited index: start over, the files themselves are still checked
            return {}
        return {relpath: PulledEntry(str(e["sha256"]), int(e["size"]), float(e["used"]))
                for relpath, e in raw.items()}

    def _write(self, entries: dict[str, PulledEntry]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temp = self.root / "index.json.tmp"
        temp.write_text(json.dumps({relpath: {"sha256": e.sha256, "size": e.size, "used": e.used}
                                    for relpath, e in sorted(entries.items())}, indent=1))
        os.replace(temp, self.root / "index.json")

    @contextlib.contextmanager
    def _index(self) -> Iterator[dict[str, PulledEntry]]:
        """The index under its lock; what the block leaves in the dict is written back."""
        with _locked(self.root / "index.lock"):
            entries = self._read()
            # a pulled file an operator removed by hand is no longer ours to count
            entries = {p: e for p, e in entries.items() if (self.models_dir / p).exists()}
            yield entries
            self._write(entries)

    # -- what callers ask -----------------------------------------------------------------------------------

    def pulled(self) -> dict[str, str]:
        """Path inside the folder -> sha256 of every file this cache installed and still holds."""
        with _locked(self.root / "index.lock"):
            return {p: e.sha256 for p, e in self._read().items() if (self.models_dir / p).exists()}

    def has(self, relpath: str, sha256: str) -> bool:
        return self.pulled().get(relpath) == sha256

    def used_bytes(self) -> int:
        with _locked(self.root / "index.lock"):
            return sum(e.size for p, e in self._read().items() if (self.models_dir / p).exists())

    def touch(self, relpaths: Iterable[str]) -> None:
        """Count these pulled files as used now (files not pulled by this cache are ignored)."""
        wanted = set(relpaths)
        if not wanted or not (self.root / "index.json").exists():
            return
        with self._index() as entries:
            now = time.time()
            for relpath in wanted & entries.keys():
                entries[relpath].used = now

    def ensure(self, relpath: str, sha256: str, size: int, download: Callable[[Path], None],
               pinned: Iterable[str] = ()) -> bool:
        """Make ``relpath`` hold the file with ``sha256``; ``download(part)`` writes its bytes to ``part``.
        Returns True when this call downloaded it, False when it was already there (pulled before, by another
        process meanwhile, or the operator's own file). Raises HashMismatchError, or what ``download`` raised;
        either way nothing is left behind."""
        target = self.models_dir / relpath
        with _locked(self.root / "locks" / f"{sha256}.lock"):
            if self._touch_if_present(relpath, sha256, target):
                return False
            partial = self.root / "partial" / f"{sha256}.{os.getpid()}.part"
            partial.parent.mkdir(parents=True, exist_ok=True)
            for stale in partial.parent.glob(f"{sha256}.*.part"):
                stale.unlink(missing_ok=True)  # a download of a process that died holding this lock
            try:
                download(partial)
                got = file_sha256(partial)
                if got != sha256:
                    raise HashMismatchError(relpath, sha256, got)
                self._make_room(relpath, size, set(pinned))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            with self._index() as entries:
                entries[relpath] = PulledEntry(sha256, target.stat().st_size, time.time())
            return True

    def _touch_if_present(self, relpath: str, sha256: str, target: Path) -> bool:
        with self._index() as entries:
            entry = entries.get(relpath)
            if entry is not None and entry.sha256 == sha256:
                entry.used = time.time()
                return True
            if entry is None and target.exists():
                return True  # the operator's own file under this name: used as it is, never ours to replace
            return False

    def _make_room(self, incoming: str, size: int, keep: set[str]) -> None:
        """Evict the least recently used pulled files (none of ``keep``) until ``incoming`` (``size`` bytes, which
        replaces any older pulled copy under its path) fits in the budget."""
        if self.budget_bytes <= 0:
            return
        with self._index() as entries:
            used = sum(e.size for p, e in entries.items() if p != incoming)
            for relpath, entry in sorted(entries.items(), key=lambda item: item[1].used):
                if used + size <= self.budget_bytes:
                    break
                if relpath in keep or relpath == incoming:
                    continue
                (self.models_dir / relpath).unlink(missing_ok=True)
                del entries[relpath]
                used -= entry.size
