"""A daemon thread that runs one task at a fixed period and survives its failures."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Periodic:
    """Subclasses implement `tick`; an exception is logged and the next tick runs on time, because a
    control thread that dies silently leaves a job running with no lease renewals."""

    def __init__(self, name: str, period: float) -> None:
        self.name = name
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.tick()
            except Exception:
                log.exception("%s failed", self.name)
