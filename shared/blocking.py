"""Work that may block for long, refused where it would stall an event loop.

Some steps that are usually cheap can take long on a rare call: hashing a model file seen for the first time
(seconds for a checkpoint), reading the model store's registry when its copy has expired, asking Redis for the
workers' upscaler checks. Code that runs them on an event loop for speed (a submit's checks: `POST /v1/jobs` runs
them on the loop unless one of these is due) does so inside :func:`refused`; each such step calls :func:`check`
first, which raises :class:`WouldBlock` there, and the caller runs the whole thing again in a thread. The steps
must not have changed anything before they check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_refused: ContextVar[bool] = ContextVar("blocking_refused", default=False)


class WouldBlock(Exception):  # noqa: N818 - a signal to move the work to a thread, not an error
    """A step that may block was reached inside :func:`refused`: run the work in a thread instead."""


def check(step: str) -> None:
    """Call before a step that may block for long: raises :class:`WouldBlock` inside :func:`refused`."""
    if _refused.get():
        raise WouldBlock(step)


@contextmanager
def refused() -> Iterator[None]:
    """While the block runs (in this context), steps that may block raise :class:`WouldBlock`."""
    token = _refused.set(True)
    try:
        yield
    finally:
        _refused.reset(token)
