"""Model file hashes exactly as the WebUI computes them, computed once per file version.

The WebUI names checkpoints and LoRAs by hash in every infotext ("Model hash: 7f96a1a9ca",
``Lora hashes: "name: 0123456789ab"``) and users look models up by those hashes, so ours must be
the same digests (``modules/hashes.py``, ``sd_models.model_hash``, the Lora extension's
``NetworkOnDisk``). Hashing a 2-7 GB checkpoint takes seconds, so :class:`HashCache` remembers each
file's digest, keyed by path, size and modification time, optionally across restarts in a JSON file.

Diffusers folders have no hash in the WebUI (it loads single files only). The farm gives them one
(:func:`sha256_folder`) so that titles, infotexts and ``Model hash`` lookups work the same way: the
SHA-256 of a ``sha256sum``-style manifest of the folder's ``.safetensors`` weight files, so it changes
when any weight changes and not when a config or tokenizer file is edited.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from shared import blocking

__all__ = [
    "HashCache",
    "addnet_hash",
    "checkpoint_short_hash",
    "legacy_model_hash",
    "lora_short_hash",
    "sha256_file",
    "sha256_folder",
]

logger = logging.getLogger(__name__)

BLOCK_SIZE = 1024 * 1024
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def _digest_rest(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: file.read(BLOCK_SIZE), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of the whole file, read in 1 MiB blocks: the WebUI's ``sha256`` in the API."""
    with open(path, "rb") as file:
        return _digest_rest(file)


def folder_weight_files(folder: Path | str) -> list[tuple[str, Path]]:
    """A diffusers folder's weight files as ``(relative POSIX path, path)``, sorted by that path's bytes."""
    folder = Path(folder)
    files = [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*.safetensors") if p.is_file()]
    return sorted(files, key=lambda item: item[0].encode())


def sha256_folder(folder: Path | str) -> str:
    r"""The farm's SHA-256 of a diffusers folder: the digest of its weight-file manifest.

    The manifest has one line per ``.safetensors`` file under the folder, sorted by relative path:
    ``"<sha256 of the file>  <relative path>\n"``, exactly what ``sha256sum`` prints. So it can be
    checked by hand with ``cd FOLDER && find . -name '*.safetensors' | sed 's|^\./||' | LC_ALL=C sort |
    xargs sha256sum | sha256sum``. A folder without weight files hashes the empty manifest.
    """
    digest = hashlib.sha256()
    for relative, path in folder_weight_files(folder):
        digest.update(f"{sha256_file(path)}  {relative}\n".encode())
    return digest.hexdigest()


def sha256_path(path: Path | str) -> str:
    """:func:`sha256_folder` for a directory, :func:`sha256_file` for anything else."""
    return sha256_folder(path) if Path(path).is_dir() else sha256_file(path)


def checkpoint_short_hash(path: Path | str) -> str:
    """The "Model hash" of an infotext and the ``[0123456789]`` in a checkpoint title (files and folders)."""
    return sha256_path(path)[:10]


def legacy_model_hash(path: Path | str) -> str:
    """The pre-2023 "Model hash": 8 hex digits of the 64 KiB at 1 MiB, "NOFILE" when missing.

    It reads so little of the file that different checkpoints can collide; it is kept only to
    recognise old infotexts. A file shorter than 1 MiB hashes what is there, as in the WebUI.
    A diffusers folder never had one: it gives "NOFILE" too.
    """
    if Path(path).is_dir():
        return "NOFILE"
    if not Path(path).exists():
        from shared.models.store_registry import record_at

        record = record_at(path)
        return record.legacy_hash if record is not None and record.legacy_hash else "NOFILE"
    try:
        with open(path, "rb") as file:
            file.seek(_LEGACY_OFFSET)
            return hashlib.sha256(file.read(_LEGACY_LENGTH)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def addnet_hash(path: Path | str) -> str:
    """The SHA-256 of a safetensors file's tensor data, skipping the length and the JSON header.

    This is kohya-ss's "addnet" hash, which the WebUI uses for LoRAs so that editing a LoRA's
    metadata does not change its hash.
    """
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(header_length + 8)
        return _digest_rest(file)


def _safetensors_metadata(path: Path | str) -> dict[str, object]:
    """The ``__metadata__`` of a safetensors header; empty when there is none or it is unreadable."""
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        if not 2 < header_length <= _MAX_SAFETENSORS_HEADER:
            return {}
        header = file.read(header_length)
    if header[:2] not in (b'{"', b"{'"):
        return {}
    try:
        metadata = json.loads(header).get("__metadata__", {})
    except (ValueError, AttributeError) as e:  # not JSON, or JSON that is not an object
        logger.warning("unreadable safetensors header in %s: %s", path, e)
        return {}
    return metadata if isinstance(metadata, dict) else {}


def lora_short_hash(path: Path | str) -> str:
    """A LoRA's 12-hex-digit hash as listed in "Lora hashes".

    Like the WebUI: the ``sshs_model_hash`` that kohya-ss's trainer writes into the metadata when
    present, else the addnet hash for a .safetensors file and the whole-file SHA-256 for others.
    """
    if Path(path).suffix.lower() != ".safetensors":
        return sha256_file(path)[:12]
    recorded = _safetensors_metadata(path).get("sshs_model_hash")
    if isinstance(recorded, str) and recorded:
        return recorded[:12]
    return addnet_hash(path)[:12]


def _registered_hash(kind: str, path: Path) -> str | None:
    """A digest the model store's registry holds for a file this machine does not have (yet)."""
    from shared.models.store_registry import record_at

    record = record_at(path)
    if record is None:
        return None
    return record.sha256 if kind == "sha256" else (record.lora_hash or record.sha256[:12])


# The hash-cache files this process has parsed, with the version of each it parsed (`HashCache._read_file`).
_PARSED: dict[Path, tuple[tuple[int, int, int], dict[str, dict[str, object]]]] = {}
_PARSED_LOCK = threading.Lock()


class HashCache:
    """Digests of model files, each computed once per (resolved path, size, mtime_ns).

    With a ``path`` the cache is kept in that JSON file, so a restarted worker or API does not hash
    its models again. Several processes may share the file: each merges what is on disk before
    writing, and a lost update only costs a recomputation. Safe to use from several threads.
    """

    _FORMAT = 1
    FILE_NAME = ".hashes.json"  # in the models folder, shared by the API's lists, submission and the workers

    @classmethod
    def of_models_dir(cls, models_dir: Path) -> HashCache:
        """The on-disk cache of a WebUI models folder: one file, whichever process hashes first."""
        return cls(Path(models_dir) / cls.FILE_NAME)

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, object]] = self._read_file() if self.path is not None else {}

    def sha256(self, path: Path | str) -> str:
        """The full SHA-256 of the file, or :func:`sha256_folder` of a diffusers folder."""
        return self._get("sha256", path, sha256_path)

    def checkpoint(self, path: Path | str) -> str:
        """The checkpoint's 10-digit "Model hash" (shares the cached SHA-256 with :meth:`sha256`)."""
        return self.sha256(path)[:10]

    def lora(self, path: Path | str) -> str:
        """The LoRA's 12-digit short hash, see :func:`lora_short_hash`."""
        return self._get("lora", path, lora_short_hash)

    def _get(self, kind: str, path: Path | str, compute: Callable[[Path], str]) -> str:
        resolved = Path(path).resolve()
        if not resolved.exists():
            recorded = _registered_hash(kind, resolved)
            if recorded is not None:
                return recorded
        key = f"{kind}:{resolved}"
        before = _version(resolved)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and {k: entry.get(k) for k in before} == before:
            return str(entry["value"])
        blocking.check(f"hashing {resolved}")
        value = compute(resolved)
        if _version(resolved) != before:
            return value  # the file changed while we read it: this digest may match neither version
        with self._lock:
            self._entries[key] = {**before, "value": value}
            if self.path is not None:
                self._save()
        return value

    def _read_file(self) -> dict[str, dict[str, object]]:
        """The file's entries (a copy: the caller may add to it). Parsed again only when the file is another one
        than last parsed in this process (each write replaces it: a new inode, size or mtime): a submit's checks
        open a cache for every request, and reading the file each time costs more the more models it lists."""
        assert self.path is not None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        except OSError as e:
            logger.warning("ignoring unreadable hash cache %s: %s", self.path, e)
            return {}
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with _PARSED_LOCK:
            parsed = _PARSED.get(self.path)
        if parsed is None or parsed[0] != version:
            parsed = (version, self._parse_file())
            with _PARSED_LOCK:
                _PARSED[self.path] = parsed
        return dict(parsed[1])

    def _parse_file(self) -> dict[str, dict[str, object]]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable hash cache %s: %s", self.path, e)
            return {}
        entries = (
            data.get("entries") if isinstance(data, dict) and data.get("format") == self._FORMAT else None
        )
        if not isinstance(entries, dict):
            logger.warning("ignoring hash cache %s written in another format", self.path)
            return {}
        return {key: entry for key, entry in entries.items() if isinstance(entry, dict)}

    def _save(self) -> None:
        """Write the cache; on a read-only disk the cache stays in memory and says so."""
        assert self.path is not None
        self._entries = {**self._read_file(), **self._entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            logger.warning("cannot write hash cache %s, keeping it in memory: %s", self.path, e)
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump({"format": self._FORMAT, "entries": self._entries}, file, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except OSError as e:  # a full disk, say: the digests are still right, only not kept
            Path(temporary).unlink(missing_ok=True)
            logger.warning("cannot write hash cache %s, keeping it in memory: %s", self.path, e)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _version(path: Path) -> dict[str, object]:
    """What identifies one version of a file (size, mtime) or of a folder's weight files (all of theirs)."""
    if not path.is_dir():
        stat = path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    listing = hashlib.sha256()
    total = 0
    for relative, file in folder_weight_files(path):
        stat = file.stat()
        total += stat.st_size
        listing.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"size": total, "mtime_ns": None, "files": listing.hexdigest()}
