"""Which upscaler files this worker's spandrel can use, checked in the background and advertised in the heartbeat.

Only a worker knows what network a file holds (spandrel imports torch; the gateway never does). This thread scans
the upscaler folders every period, loads each new or changed file once on the CPU (:func:`load_upscaler`, the
weights-only unpickler), keeps ``{"architecture", "scale"}`` or ``{"refused": reason}`` per file (by its location,
size and modification time), and lets the beacon publish the result. The gateway lists a refused file with that
reason and answers a job naming it with a 422 (:func:`shared.models.upscalers.fleet_upscaler_checks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.models.upscalers import scan_upscalers
from worker.control.periodic import Periodic

log = logging.getLogger(__name__)


class UpscalerChecks(Periodic):
    def __init__(self, models_dir: Path, period: float, on_change: Callable[[], None] | None = None) -> None:
        super().__init__("upscaler-checks", period)
        self.models_dir = Path(models_dir)
        self.on_change = on_change
        self._seen: dict[str, tuple[int, int, dict[str, Any]]] = {}  # location -> (size, mtime_ns, check)

    def start(self) -> None:
        """Import what a check uses in the calling thread, then start checking in the background: the thread then
        imports nothing, so it cannot deadlock with the worker's own imports."""
        import spandrel  # noqa: F401

        import worker.engine.upscalers  # noqa: F401

        super().start()

    def tick(self) -> None:
        self.check()

    def check(self) -> bool:
        """Check the files added or changed since the last call; True when what is advertised changed."""
        from worker.engine.upscalers import UpscalerRefused, load_upscaler

        changed = False
        present = set()
        for entry in scan_upscalers(self.models_dir):
            if not entry.loadable:  # refused without opening it (the gateway says why already)
                continue
            present.add(entry.location)
            try:
                stat = entry.path.stat()
            except OSError:
                continue
            seen = self._seen.get(entry.location)
            if seen is not None and seen[:2] == (stat.st_size, stat.st_mtime_ns):
                continue
            try:
                loaded = load_upscaler(entry.path, "cpu")
                result: dict[str, Any] = {"architecture": loaded.architecture, "scale": loaded.scale}
                del loaded
            except UpscalerRefused as exc:
                result = {"refused": exc.reason}
            except (OSError, MemoryError) as exc:  # a file being copied, a transient failure: try again next time
                log.warning("could not check upscaler %s: %s", entry.location, exc)
                continue
            self._seen[entry.location] = (stat.st_size, stat.st_mtime_ns, result)
            changed = True
        for gone in set(self._seen) - present:
            del self._seen[gone]
            changed = True
        if changed and self.on_change is not None:
            self.on_change()
        return changed

    def report(self) -> dict[str, dict[str, Any]]:
        """For the heartbeat: each checked file's architecture and scale, or why it is refused."""
        return {location: check for location, (_, _, check) in sorted(self._seen.items())}
