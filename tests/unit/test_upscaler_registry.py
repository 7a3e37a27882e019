"""The upscaler folders as the WebUI lists them, read without torch (shared/models/upscalers.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from shared.errors import FieldError
from shared.models.upscalers import pickle_problem, resolve_upscaler, scan_upscalers
from tests.fake_files import write_model_file


class Payload:
    """A pickle that would run a shell command when unpickled by an unrestricted loader."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("touch /tmp/renderfarm-pwned",)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for rel in ("ESRGAN/4x-UltraSharp.safetensors", "ESRGAN/sub/2x-Deep.safetensors", "SwinIR/SwinIR_4x.safetensors",
                "DAT/DAT_x3.safetensors", "HAT/HAT-L_x4.safetensors", "ScuNET/scunet_gan.safetensors"):
        write_model_file(tmp_path / rel, b"weights")
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(2)}},
               _path(tmp_path, "RealESRGAN/RealESRGAN_x4plus.pth"))
    torch.save({"conv.weight": torch.zeros(2)}, _path(tmp_path, "RealESRGAN/RealESRGAN_x2plus.pth"),
               _use_new_zipfile_serialization=False)  # the legacy format: several pickles in a row
    torch.save({"conv.weight": Payload()}, _path(tmp_path, "ESRGAN/booby-trapped.pth"))
    _path(tmp_path, "ESRGAN/junk.pth").write_bytes(b"not a pickle at all")
    _path(tmp_path, "ESRGAN/renamed-pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    return tmp_path


def _path(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_names_scales_and_order_follow_the_webui(models: Path) -> None:
    entries = {entry.name: entry for entry in scan_upscalers(models)}
    assert entries["R-ESRGAN 4x+"].scale == 4 and entries["R-ESRGAN 2x+"].scale == 2
    assert entries["4x-UltraSharp"].model_name == "ESRGAN_4x" and entries["SwinIR_4x"].model_name == "SwinIR 4x"
    assert entries["2x-Deep"].location == "ESRGAN/sub/2x-Deep.safetensors"
    assert entries["DAT_x3"].scale is None  # the WebUI does not know a local DAT file's scale
    names = [entry.name for entry in scan_upscalers(models)]
    assert names == sorted(names, key=str.lower)


def test_pickles_are_checked_by_their_opcodes_without_running_them(models: Path) -> None:
    marker = Path("/tmp/renderfarm-pwned")
    marker.unlink(missing_ok=True)
    entries = {entry.name: entry for entry in scan_upscalers(models)}
    assert entries["R-ESRGAN 4x+"].loadable and entries["R-ESRGAN 2x+"].loadable
    assert "calls posix.system" in (entries["booby-trapped"].refused_reason or "")
    assert "not a readable torch file" in (entries["junk"].refused_reason or "")
    assert "renamed pickle" in (entries["renamed-pickle"].refused_reason or "")
    assert not marker.exists()


def test_pickle_problem_reads_both_torch_formats(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "zip.pth")
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"w": Payload()}, tmp_path / "legacy-trap.pth", _use_new_zipfile_serialization=False)
    assert pickle_problem(tmp_path / "zip.pth") is None
    assert pickle_problem(tmp_path / "legacy.pth") is None
    assert "posix.system" in (pickle_problem(tmp_path / "legacy-trap.pth") or "")


@pytest.mark.parametrize(("requested", "name", "location"), [
    ("R-ESRGAN 4x+", "R-ESRGAN 4x+", "RealESRGAN/RealESRGAN_x4plus.pth"),
    ("RealESRGAN_x4plus", "R-ESRGAN 4x+", "RealESRGAN/RealESRGAN_x4plus.pth"),
    ("4x-UltraSharp.safetensors", "4x-UltraSharp", "ESRGAN/4x-UltraSharp.safetensors"),
    ("ESRGAN/sub/2x-Deep.safetensors", "2x-Deep", "ESRGAN/sub/2x-Deep.safetensors"),
])
def test_a_model_resolves_by_name_stem_file_or_location(models: Path, requested: str, name: str,
                                                        location: str) -> None:
    resolved, entry = resolve_upscaler(models, requested, ("body", "upscaler_1"))
    assert resolved == name and entry is not None and entry.location == location


def test_builtins_and_latent_modes(models: Path) -> None:
    assert resolve_upscaler(models, "lanczos", ("f",)) == ("Lanczos", None)
    assert resolve_upscaler(models, "latent (bicubic)", ("f",), latent=True) == ("Latent (bicubic)", None)
    with pytest.raises(FieldError, match="unknown upscaler"):  # latent modes only serve hires fix
        resolve_upscaler(models, "Latent", ("body", "upscaler_1"))


@pytest.mark.parametrize(("requested", "message"), [
    ("booby-trapped", "is refused: its pickle calls posix.system"),
    ("../VAE/x", "unknown upscaler"),
    ("nope", "available: None, Lanczos, Nearest, 2x-Deep"),
])
def test_refusals_name_the_field_and_the_reason(models: Path, requested: str, message: str) -> None:
    with pytest.raises(FieldError) as info:
        resolve_upscaler(models, requested, ("body", "upscaler_2"))
    assert info.value.field == ("body", "upscaler_2") and message in info.value.message
