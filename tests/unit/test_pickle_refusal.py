"""Pickle checkpoints are listed as refused and never unpickled: a booby-trapped file proves it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from shared.errors import FieldError
from shared.models.registry import resolve_checkpoint, scan_checkpoints


class _Trap:
    """Unpickling this calls Path.touch(marker): harmless, but it leaves a trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _booby_trapped_models(tmp_path: Path) -> tuple[Path, Path]:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    marker = tmp_path / "unpickled.marker"
    for name in ("evil.ckpt", "evil2.pt", "evil3.bin"):
        (models / "Stable-diffusion" / name).write_bytes(pickle.dumps(_Trap(marker)))
    return models, marker


def test_the_trap_works_when_unpickled(tmp_path: Path) -> None:
    """The counterpart: unpickling the file really creates the marker, so its absence below means something."""
    models, marker = _booby_trapped_models(tmp_path)
    pickle.loads((models / "Stable-diffusion" / "evil.ckpt").read_bytes())
    assert marker.exists()


def test_pickles_are_listed_as_refused_and_never_opened(tmp_path: Path) -> None:
    models, marker = _booby_trapped_models(tmp_path)
    listed = {c.filename: c for c in scan_checkpoints(models)}
    assert set(listed) == {"evil.ckpt", "evil2.pt", "evil3.bin"}
    assert all(not c.loadable and "only .safetensors" in (c.refused_reason or "") for c in listed.values())
    for name in ("evil", "evil.ckpt", "evil2", "evil3.bin"):
        with pytest.raises(FieldError) as err:
            resolve_checkpoint(models, name)
        assert err.value.field == ("body", "model") and "refused" in err.value.message
    assert not marker.exists()


def test_worker_loader_refuses_pickles_without_reading_them(tmp_path: Path) -> None:
    from worker.engine.checkpoint_loader import UnsupportedCheckpointError, detect_architecture, load_pipeline

    models, marker = _booby_trapped_models(tmp_path)
    path = models / "Stable-diffusion" / "evil.ckpt"
    for call in (detect_architecture, load_pipeline):
        with pytest.raises(UnsupportedCheckpointError):
            call(path)
    assert not marker.exists()
