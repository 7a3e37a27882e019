"""Upscaler models in the WebUI's folders, named as the WebUI names them; torch-free.

The WebUI lists its pixel upscalers in ``shared.sd_upscalers``: the built-in None, Lanczos and Nearest
first, then every model upscaler sorted by name (case-insensitive). Each model class scans its own folder
(recursively) and names files its own way (``modules/esrgan_model.py``, ``realesrgan_model.py``,
``dat_model.py``, ``hat_model.py``, the SwinIR and ScuNET extensions):

- ``models/ESRGAN``, ``DAT``, ``HAT``, ``SwinIR``, ``ScuNET``: the file's stem (``4x-UltraSharp``);
- ``models/RealESRGAN``: the WebUI's fixed names for Real-ESRGAN's released files (``RealESRGAN_x4plus.pth``
  is ``R-ESRGAN 4x+``); other files there by their stem.

The WebUI scans ``.pth``/``.pt`` only and loads them with spandrel's restricted unpickler; the farm also reads
``.safetensors`` (as Forge does) and reads ``.pth`` only through torch's ``weights_only`` unpickler, which
rebuilds tensors and runs no code. Here, without torch, a pickle is checked by reading its opcodes (never
executing them): a file whose pickle calls anything but the tensor rebuilders that unpickler allows is listed
as refused with what it calls. Which network a file holds is only known to spandrel, on a worker: each worker
checks every file in the background and advertises what it found (``upscaler_checks`` in its heartbeat,
:func:`fleet_upscaler_checks`), so a file spandrel does not recognise is listed as refused with the reason and a
job naming it is a 422; until a worker has checked it, such a job fails as the user's error, naming the file.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import FieldError
from shared.models.safetensors_header import safetensors_problem

__all__ = [
    "BUILTIN_UPSCALERS",
    "LATENT_UPSCALERS",
    "UPSCALER_FOLDERS",
    "UpscalerFile",
    "fleet_upscaler_checks",
    "pickle_problem",
    "resolve_upscaler",
    "scan_upscalers",
]

# The WebUI's latent upscale modes (shared.latent_upscale_modes) and its built-in pixel upscalers.
LATENT_UPSCALERS: tuple[str, ...] = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
BUILTIN_UPSCALERS: tuple[str, ...] = ("None", "Lanczos", "Nearest")

# folder -> (the WebUI's model_name for its entries, the scale it reports; None: not known from the name)
UPSCALER_FOLDERS: dict[str, tuple[str | None, int | None]] = {
    "ESRGAN": ("ESRGAN_4x", 4),
    "RealESRGAN": (None, 4),
    "DAT": (None, None),
    "HAT": (None, 4),
    "SwinIR": ("SwinIR 4x", 4),
    "ScuNET": ("ScuNET GAN", 4),
}
# modules/realesrgan_model.py get_realesrgan_models: released file stem -> (name, scale)
REALESRGAN_NAMES: dict[str, tuple[str, int]] = {
    "realesr-general-x4v3": ("R-ESRGAN General 4xV3", 4),
    "realesr-general-wdn-x4v3": ("R-ESRGAN General WDN 4xV3", 4),
    "realesr-animevideov3": ("R-ESRGAN AnimeVideo", 4),
    "RealESRGAN_x4plus": ("R-ESRGAN 4x+", 4),
    "RealESRGAN_x4plus_anime_6B": ("R-ESRGAN 4x+ Anime6B", 4),
    "RealESRGAN_x2plus": ("R-ESRGAN 2x+", 2),
}
SUFFIXES = (".safetensors", ".pth", ".pt")
# What torch's weights_only unpickler lets a state dict call: containers and tensor rebuilders.
_SAFE_GLOBAL = re.compile(
    r"^(collections (OrderedDict|defaultdict)"
    r"|torch\._utils _rebuild_(tensor|tensor_v2|tensor_v3|parameter|parameter_with_state|sparse_tensor|qtensor)"
    r"|torch (Size|device|dtype|float16|float32|float64|bfloat16|int8|int16|int32|int64|uint8|bool)"
    r"|torch [A-Za-z]+Storage"
    r"|torch\.serialization _get_layout|torch (strided|sparse_coo)"
    r"|builtins (set|frozenset|bytearray|slice|complex|int|float|str|bool|tuple|list|dict)"
    r"|_codecs encode)$"
)


@dataclass(frozen=True)
class UpscalerFile:
    """One model upscaler file as the WebUI lists it."""

    name: str  # the WebUI's name: "R-ESRGAN 4x+", "4x-UltraSharp"
    folder: str  # "ESRGAN", "RealESRGAN", ...
    filename: str  # relative to models/<folder>, with extension
    path: Path
    scale: int | None
    model_name: str | None  # the WebUI's scaler model_name (ESRGAN_4x, SwinIR 4x) or None
    refused_reason: str | None = None
    size: int = 0

    @property
    def location(self) -> str:
        """Relative to the models folder: what a job's contract stores and the worker opens."""
        return f"{self.folder}/{self.filename}"

    @property
    def loadable(self) -> bool:
        return self.refused_reason is None


def pickle_problem(path: Path) -> str | None:
    """Why a ``.pth``/``.pt`` file cannot be read by torch's weights-only unpickler, found by reading its
    pickles' opcodes without running them; None when they only rebuild tensors and containers.

    A zip file (torch's format since 1.6) holds one ``data.pkl``; the legacy format is four pickles in a row
    (magic number, protocol, system info, the state dict) followed by a fifth and the raw storage bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not pickles:
                    return "a zip file without a torch pickle (data.pkl)"
                return _calls_problem(archive.read(pickles[0]), 1)
        return _calls_problem(path.read_bytes(), 4)
    except (OSError, zipfile.BadZipFile) as exc:
        return f"not a readable torch file ({exc.__class__.__name__}: {exc})"


def _calls_problem(data: bytes, expected: int) -> str | None:
    """Scan the first pickles of ``data`` (at least ``expected`` of them) for calls the weights-only loader refuses."""
    position, parsed = 0, 0
    while parsed < max(expected, 5) and position < len(data):
        strings: list[str] = []
        try:
            for opcode, arg, offset in pickletools.genops(data[position:]):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif opcode.name in ("GLOBAL", "STACK_GLOBAL"):
                    called = str(arg) if opcode.name == "GLOBAL" else " ".join(strings[-2:])
                    if not _SAFE_GLOBAL.match(called):
                        return f"its pickle calls {called.replace(' ', '.')}, which the weights-only loader refuses"
                elif opcode.name == "STOP":
                    position += (offset or 0) + 1
        except ValueError as exc:  # not a pickle here: junk, or the legacy format's raw storage bytes
            if parsed < expected:
                return f"not a readable torch file ({exc})"
            return None
        parsed += 1
    return None if parsed >= expected else "not a readable torch file (truncated)"


def _refusal(path: Path) -> str | None:
    if path.suffix.lower() == ".safetensors":
        return safetensors_problem(path)
    return pickle_problem(path)


def _entry(folder: str, root: Path, path: Path, stored_size: int | None = None) -> UpscalerFile:
    """``stored_size``: a model store file not on this machine (checked when it was added)."""
    model_name, scale = UPSCALER_FOLDERS[folder]
    stem = path.stem
    name = stem
    if folder == "RealESRGAN" and stem in REALESRGAN_NAMES:
        name, scale = REALESRGAN_NAMES[stem]
    return UpscalerFile(name=name, folder=folder, filename=path.relative_to(root).as_posix(), path=path,
                        scale=scale, model_name=model_name,
                        refused_reason=None if stored_size is not None else _refusal(path),
                        size=stored_size if stored_size is not None else path.stat().st_size)


def scan_upscalers(models_dir: Path) -> list[UpscalerFile]:
    """Every model upscaler file, sorted by name as the WebUI sorts ``sd_upscalers`` (refused ones included), and
    the model store's that this machine does not hold (yet; checked when they were added)."""
    from shared.models.store_registry import registered

    found = []
    for folder in UPSCALER_FOLDERS:
        root = Path(models_dir) / folder
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
                    if path.resolve().is_relative_to(root.resolve()):
                        found.append(_entry(folder, root, path))
        here = {entry.filename for entry in found if entry.folder == folder}
        for name, record in registered(models_dir, folder).items():
            if name not in here:
                found.append(_entry(folder, root, root / name, stored_size=record.size))
    return sorted(found, key=lambda entry: entry.name.lower())


def fleet_upscaler_checks(infos: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the live workers found in each upscaler file (their heartbeats' ``upscaler_checks``): by location,
    ``{"architecture", "scale"}`` or ``{"refused": reason}``; a refusal from any worker wins."""
    merged: dict[str, dict[str, Any]] = {}
    for info in infos:
        for location, check in (info.get("upscaler_checks") or {}).items():
            if isinstance(check, dict) and (location not in merged or "refused" in check):
                merged[str(location)] = dict(check)
    return merged


def resolve_upscaler(models_dir: Path, requested: str, field: tuple[str | int, ...], *,
                     latent: bool = False, checks: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> tuple[str, UpscalerFile | None]:
    """(canonical name, model file or None for a built-in) of the upscaler ``requested`` names.

    Accepted: the built-ins (and the latent modes when ``latent``), a model's WebUI name, its file stem or
    file name, or ``folder/file``. Raises FieldError naming ``field``: unknown names list what is installed,
    a refused file says why (refused here, or by the workers' ``checks``)."""
    wanted = requested.strip()
    builtins = BUILTIN_UPSCALERS + (LATENT_UPSCALERS if latent else ())
    for name in builtins:
        if wanted.lower() == name.lower():
            return name, None
    from shared.models.store_registry import refresh_for

    files = scan_upscalers(models_dir)
    if not any(wanted in (e.name, e.filename, e.path.stem, e.location) for e in files) and refresh_for(models_dir):
        files = scan_upscalers(models_dir)  # added to the model store within the view's last second?
    for entry in files:
        if wanted in (entry.name, entry.filename, entry.path.stem, entry.location):
            refused = entry.refused_reason or (checks or {}).get(entry.location, {}).get("refused")
            if refused is not None:
                raise FieldError(field, f"upscaler {requested!r} ({entry.location}) is refused: {refused}")
            return entry.name, entry
    available = [*builtins, *(entry.name for entry in files if entry.loadable)]
    raise FieldError(field, f"unknown upscaler {requested!r}; available: {', '.join(available)}")
