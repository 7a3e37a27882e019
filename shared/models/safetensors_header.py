"""The JSON header of a ``.safetensors`` file: tensor names, shapes, dtypes and ``__metadata__``.

Why a reader of our own: the header is all the farm needs to tell a checkpoint's architecture, to
check a file holds every weight a config expects, to size a model before loading it, and to list a
LoRA's training metadata or an embedding's vector count. Reading it needs only ``json`` and
``struct``, so the API (which must stay torch-free) and the worker share this one reader; no tensor
data is read and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class InvalidSafetensorsError(ValueError):
    """The file is not a readable ``.safetensors`` file (too short, a bad length, not a JSON map)."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """``metadata`` is the ``__metadata__`` map; ``shapes`` and ``dtypes`` are in the header's order."""

    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse the header of a ``.safetensors`` file; raises :class:`InvalidSafetensorsError` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise InvalidSafetensorsError(f"{path.name}: file too short to be safetensors")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise InvalidSafetensorsError(f"{path.name}: not a valid safetensors file (bad header)")
            raw = json.loads(fh.read(length))
    except OSError as exc:
        raise InvalidSafetensorsError(f"{path.name}: cannot read file: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSafetensorsError(f"{path.name}: not a valid safetensors file ({exc})") from exc
    if not isinstance(raw, dict):
        raise InvalidSafetensorsError(f"{path.name}: not a valid safetensors file (header is not a map)")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InvalidSafetensorsError(f"{path.name}: malformed __metadata__ (not a map)")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for key, info in raw.items():
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise InvalidSafetensorsError(f"{path.name}: malformed header entry {key!r}")
        try:
            shapes[key] = tuple(int(d) for d in info["shape"])
        except (TypeError, ValueError) as exc:
            raise InvalidSafetensorsError(f"{path.name}: malformed header entry {key!r}") from exc
        dtypes[key] = str(info.get("dtype"))
    return SafetensorsHeader(metadata=dict(metadata), shapes=shapes, dtypes=dtypes)


def safetensors_header_or_none(path: Path) -> SafetensorsHeader | None:
    """The header, or None for a file that is not readable safetensors: for lists that show every file."""
    try:
        return read_safetensors_header(path)
    except InvalidSafetensorsError:
        return None


def safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is refused unopened (its header does not parse: a pickle renamed, a truncated
    download), or None when it is readable. Registries call this on every scan, so a bad file is listed as
    refused and named in a 422 at submit instead of failing on a worker.

    The answer is remembered per file version (its inode, size and modification time, to the nanosecond): a POST
    scans the checkpoints folder, and re-parsing every header's JSON was half of a submit's cost (issue 20). A
    file replaced or rewritten in place has a new version and is read again."""
    try:
        info = Path(path).stat()
    except OSError as exc:
        return f"{Path(path).name}: cannot read file: {exc}"
    return _problem_of_version(str(path), info.st_ino, info.st_size, info.st_mtime_ns)


@lru_cache(maxsize=4096)
def _problem_of_version(path: str, inode: int, size: int, mtime_ns: int) -> str | None:
    try:
        read_safetensors_header(Path(path))
    except InvalidSafetensorsError as exc:
        return f"{exc}; only real .safetensors files are loaded (a renamed pickle is never opened)"
    return None
