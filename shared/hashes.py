"""Model file hashes exactly as the WebUI computes them, computed once per file version.

The WebUI names checkpoints and LoRAs by hash in every infotext ("Model hash: 7f96a1a9ca",
``Lora hashes: "name: 0123456789ab"``) and users look models up by those hashes, so ours must be
the same digests (``modules/hashes.py``, ``sd_models.model_hash``, the Lora extension's
``NetworkOnDisk``). Hashing a 2-7 GB checkpoint takes seconds, so :class:`HashCache` remembers each
file's digest, keyed by path, size and modification time, optionally across restarts in a JSON file.
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

__all__ = [
    "HashCache",
    "addnet_hash",
    "checkpoint_short_hash",
    "legacy_model_hash",
    "lora_short_hash",
    "sha256_file",
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


def checkpoint_short_hash(path: Path | str) -> str:
    """The "Model hash" of an infotext and the ``[0123456789]`` in a checkpoint title."""
    return sha256_file(path)[:10]


def legacy_model_hash(path: Path | str) -> str:
    """The pre-2023 "Model hash": 8 hex digits of the 64 KiB at 1 MiB, "NOFILE" when missing.

    It reads so little of the file that different checkpoints can collide; it is kept only to
    recognise old infotexts. A file shorter than 1 MiB hashes what is there, as in the WebUI.
    """
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


class HashCache:
    """Digests of model files, each computed once per (resolved path, size, mtime_ns).

    With a ``path`` the cache is kept in that JSON file, so a restarted worker or API does not hash
    its models again. Several processes may share the file: each merges what is on disk before
    writing, and a lost update only costs a recomputation. Safe to use from several threads.
    """

    _FORMAT = 1

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, object]] = self._read_file() if self.path is not None else {}

    def sha256(self, path: Path | str) -> str:
        """The full SHA-256 of the file."""
        return self._get("sha256", path, sha256_file)

    def checkpoint(self, path: Path | str) -> str:
        """The checkpoint's 10-digit "Model hash" (shares the cached SHA-256 with :meth:`sha256`)."""
        return self.sha256(path)[:10]

    def lora(self, path: Path | str) -> str:
        """The LoRA's 12-digit short hash, see :func:`lora_short_hash`."""
        return self._get("lora", path, lora_short_hash)

    def _get(self, kind: str, path: Path | str, compute: Callable[[Path], str]) -> str:
        resolved = Path(path).resolve()
        key = f"{kind}:{resolved}"
        before = resolved.stat()
        with self._lock:
            entry = self._entries.get(key)
        if (
            entry is not None
            and entry.get("size") == before.st_size
            and entry.get("mtime_ns") == before.st_mtime_ns
        ):
            return str(entry["value"])
        value = compute(resolved)
        after = resolved.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return value  # the file changed while we read it: this digest may match neither version
        with self._lock:
            self._entries[key] = {"size": before.st_size, "mtime_ns": before.st_mtime_ns, "value": value}
            if self.path is not None:
                self._save()
        return value

    def _read_file(self) -> dict[str, dict[str, object]]:
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
