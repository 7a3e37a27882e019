"""Workers check upscaler files with spandrel in the background and advertise what they found; the gateway merges it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devtools.demo_models.upscalers import write_compact, write_esrgan
from shared.errors import FieldError
from shared.models.upscalers import fleet_upscaler_checks, resolve_upscaler
from tests.fake_files import write_model_file
from worker.control.upscaler_checks import UpscalerChecks


def test_a_worker_checks_new_and_changed_files_once_and_forgets_removed_ones(tmp_path: Path) -> None:
    write_esrgan(tmp_path / "ESRGAN" / "4x-a.safetensors")
    write_compact(tmp_path / "RealESRGAN" / "realesr-general-x4v3.pth", scale=4)
    stranger = write_model_file(tmp_path / "ESRGAN" / "stranger.safetensors", b"not an upscaler")
    changes: list[int] = []
    checks = UpscalerChecks(tmp_path, period=60, on_change=lambda: changes.append(1))
    assert checks.check() is True and changes == [1]
    report = checks.report()
    assert report["ESRGAN/4x-a.safetensors"] == {"architecture": "ESRGAN", "scale": 4}
    assert report["RealESRGAN/realesr-general-x4v3.pth"] == {"architecture": "Compact", "scale": 4}
    assert "stranger.safetensors" in report["ESRGAN/stranger.safetensors"]["refused"]
    assert checks.check() is False  # nothing new: nothing loaded again
    write_esrgan(tmp_path / "ESRGAN" / "stranger.safetensors", scale=2)  # replaced by a real one
    os.utime(stranger, ns=(1, 1))
    assert checks.check() is True
    assert checks.report()["ESRGAN/stranger.safetensors"] == {"architecture": "ESRGAN", "scale": 2}
    stranger.unlink()
    assert checks.check() is True and "ESRGAN/stranger.safetensors" not in checks.report()


def test_the_gateway_refuses_what_any_worker_refused(tmp_path: Path) -> None:
    write_model_file(tmp_path / "ESRGAN" / "odd.safetensors", b"weights")
    infos = [{"upscaler_checks": {"ESRGAN/odd.safetensors": {"architecture": "ESRGAN", "scale": 4}}},
             {"upscaler_checks": {"ESRGAN/odd.safetensors": {"refused": "unknown architecture"}}}, {}]
    checks = fleet_upscaler_checks(infos)
    assert checks == {"ESRGAN/odd.safetensors": {"refused": "unknown architecture"}}
    assert resolve_upscaler(tmp_path, "odd", ("body", "upscaler_1"))[0] == "odd"  # nobody checked it yet
    with pytest.raises(FieldError, match="is refused: unknown architecture") as info:
        resolve_upscaler(tmp_path, "odd", ("body", "upscaler_1"), checks=checks)
    assert info.value.field == ("body", "upscaler_1")
