"""A submit's checkpoint lookup (shared/models/registry.py): the folder is walked at most once a second per process,
and a name the recent walk lacks is looked up afresh, so a file just added is found at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from shared.errors import FieldError
from shared.models import registry


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Each folder walk, counted."""
    seen: list[Path] = []
    scan = registry.scan_checkpoints

    def counted(models_dir: Path) -> list[registry.CheckpointFile]:
        seen.append(models_dir)
        return scan(models_dir)

    monkeypatch.setattr(registry, "scan_checkpoints", counted)
    return seen


def _loadable(folder: Path, name: str) -> None:
    """A safetensors file the scan lists as loadable (its tensors are never read here)."""
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(folder / f"{name}.safetensors"))


def _refused(models: Path, name: str) -> str:
    """The lookup's answer for a pickle checkpoint: it is found, and refused by name."""
    with pytest.raises(FieldError) as err:
        registry.resolve_checkpoint(models, name)
    return err.value.message


def test_a_recent_walk_is_reused_and_a_new_name_is_found_at_once(tmp_path: Path, walks: list[Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    _loadable(folder, "base")  # a walk that found nothing loadable is never reused
    (folder / "old.ckpt").write_bytes(b"not read")
    models = tmp_path / "models"
    assert "refused" in _refused(models, "old")
    assert "refused" in _refused(models, "old")
    assert len(walks) == 1  # the second lookup reused the first walk
    (folder / "new.ckpt").write_bytes(b"not read")
    assert "refused" in _refused(models, "new")  # not "unknown model": the miss walked the folder again
    assert len(walks) == 2
    assert "unknown model 'gone'" in _refused(models, "gone")
    monkeypatch.setattr(registry, "RECENT_SCAN_SECONDS", 0.0)
    (folder / "old.ckpt").unlink()
    assert "unknown model 'old'" in _refused(models, "old")  # once the walk is old, a removed file is gone


def test_the_default_checkpoint_is_found_as_soon_as_the_first_one_arrives(tmp_path: Path, walks: list[Path]) -> None:
    """An empty folder walked a moment ago does not hide the first checkpoint put there since."""
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    models = tmp_path / "models"
    assert registry.default_checkpoint(models, None) is None
    _loadable(folder, "first")
    assert registry.default_checkpoint(models, None) == "first"
