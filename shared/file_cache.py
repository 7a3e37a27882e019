"""A file's parsed contents, re-read only when the file changed (its modification time or size): an operator's edit
needs no restart, and reading it costs nothing per request while it stays the same."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class FileVersionCache(Generic[T]):
    """Parsed files by path, each kept with the version (mtime_ns, size) it was read at. Thread-safe."""

    def __init__(self, read: Callable[[Path], T]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[tuple[int, int], T]] = {}

    def get(self, path: Path) -> T:
        stat = path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._entries.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
        value = self._read(path)
        with self._lock:
            self._entries[path] = (version, value)
        return value
