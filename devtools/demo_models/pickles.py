"""Writing ``torch.save`` files as the released ``.pth`` weights are, and booby-trapped ones for the tests that prove
a pickle's payload never runs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["MarkerTrap", "save_pth_atomically"]


def save_pth_atomically(obj: object, path: Path) -> Path:
    """``torch.save`` to a temporary name beside ``path``, then renamed: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class MarkerTrap:
    """Unpickling this calls ``Path.touch(marker)``: harmless, but it leaves a trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))
