"""VAE files and checkpoint look-ups by infotext, inside the models folder (upscalers: :mod:`shared.models.upscalers`).

A job names a VAE or an upscaler by file name, so the name is untrusted input that becomes a
path on a worker: it must resolve strictly inside ``models/VAE`` (no ``..``,
no absolute path, no symlink out), and only ``.safetensors`` files are ever accepted. Pickle
formats (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) are what most WebUI users have, so they are
refused with a reason that says what to do, rather than reported as unknown.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.errors import FieldError
from shared.models.registry import LOADABLE_SUFFIXES, REFUSED_SUFFIXES, scan_checkpoints
from shared.models.safetensors_header import safetensors_problem
from shared.webui.hashes import HashCache, legacy_model_hash

__all__ = [
    "ESRGAN_DIR",
    "VAE_DIR",
    "find_infotext_checkpoint",
    "list_model_files",
    "resolve_model_file",
    "resolve_vae",
]

VAE_DIR = "VAE"
ESRGAN_DIR = "ESRGAN"
# sd_vae values that mean "the checkpoint's own VAE".
_NO_VAE = ("", "none", "automatic")
_HEX = re.compile(r"^[0-9a-fA-F]{8}$|^[0-9a-fA-F]{10}$")


def _refusal(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        return (f"{suffix} files are pickles that can run code when loaded; convert it to .safetensors "
                "(only .safetensors files are loaded)")
    return safetensors_problem(path)


def list_model_files(models_dir: Path, folder: str) -> list[tuple[str, str | None]]:
    """Every candidate file in ``models/<folder>`` as (relative name with extension, refusal reason or None), and
    the model store's files of that folder."""
    from shared.models.store_registry import registered

    root = models_dir / folder
    found = []
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in LOADABLE_SUFFIXES + REFUSED_SUFFIXES:
                found.append((path.relative_to(root).as_posix(), _refusal(path)))
    local = {name for name, _ in found}
    # The model store's files of this folder that this machine does not hold (yet): checked when they were added.
    return found + [(name, None) for name in sorted(registered(models_dir, folder)) if name not in local]


def _safe_relative_name(name: str) -> bool:
    return bool(name) and not name.startswith(("/", "\\")) and "\\" not in name and "\x00" not in name \
        and ".." not in Path(name).parts and ":" not in Path(name).parts[0]


def resolve_model_file(models_dir: Path, folder: str, requested: str, field: tuple[str | int, ...],
                       what: str) -> str:
    """The file name (relative to ``models/<folder>``, with extension) that ``requested`` means.

    ``requested`` may be the file name or its stem (``vae-ft-mse`` or ``vae-ft-mse.safetensors``),
    as the WebUI writes both into infotexts. Raises FieldError naming ``field`` otherwise.
    """
    name = requested.strip()
    if not _safe_relative_name(name):
        raise FieldError(field, f"{what} {requested!r} is not a name inside models/{folder}/")
    from shared.models.store_registry import refresh_for

    files = list_model_files(models_dir, folder)
    if not any(name in (filename, filename.rsplit(".", 1)[0]) for filename, _ in files) and refresh_for(models_dir):
        files = list_model_files(models_dir, folder)  # added to the model store within the view's last second?
    for filename, refused in files:
        stem = filename.rsplit(".", 1)[0]
        if name in (filename, stem):
            if refused:
                raise FieldError(field, f"{what} {requested!r} is refused: {refused}")
            root = (models_dir / folder).resolve()
            if not (root / filename).resolve().is_relative_to(root):
                raise FieldError(field, f"{what} {requested!r} points outside models/{folder}/")
            return filename
    available = ", ".join(f for f, refused in files if refused is None) or "none installed"
    raise FieldError(field, f"unknown {what} {requested!r}; available in models/{folder}/: {available}")


def resolve_vae(models_dir: Path, requested: str | None, field: tuple[str | int, ...] = ("body", "vae")) -> str | None:
    """None for the checkpoint's own VAE ("Automatic", "None" or empty), else the VAE's file name."""
    if requested is None or requested.strip().lower() in _NO_VAE:
        return None
    return resolve_model_file(models_dir, VAE_DIR, requested, field, "VAE")


def find_infotext_checkpoint(models_dir: Path, model: str | None, model_hash: str | None,
                             cache: HashCache) -> str | None:
    """The installed checkpoint an infotext's "Model" / "Model hash" names, or None.

    The WebUI writes the file's base name without folder or extension, so that is compared
    first; the hash (10 digits, or 8 for the pre-2023 hash) is only computed when the name does
    not match, because hashing a checkpoint reads gigabytes (the cache keeps it for next time).
    """
    loadable = [c for c in scan_checkpoints(models_dir) if c.loadable]
    if model:
        for ckpt in loadable:
            if model.strip() in (ckpt.name, ckpt.filename, ckpt.name.rsplit("/", 1)[-1],
                                 ckpt.filename.rsplit("/", 1)[-1]):
                return ckpt.name
    if model_hash and _HEX.match(model_hash.strip()):
        wanted = model_hash.strip().lower()
        for ckpt in loadable:
            found = cache.checkpoint(ckpt.path) if len(wanted) == 10 else legacy_model_hash(ckpt.path)
            if found == wanted:
                return ckpt.name
    return None


HYPERNETWORK_DIR = "hypernetworks"
HYPERNETWORK_SUFFIXES = (".pt", ".safetensors")


def list_hypernetworks(models_dir: Path) -> dict[str, Path]:
    """The WebUI's hypernetworks (``models/hypernetworks/**/*.pt``, and ``.safetensors``) by name (the file's stem),
    with the model store's that this machine does not hold (yet). The farm stores and pulls them; rendering with
    them is not built yet (a ``<hypernet:...>`` tag is removed from the prompt)."""
    from shared.models.store_registry import registered

    root = Path(models_dir) / HYPERNETWORK_DIR
    found: dict[str, Path] = {}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in HYPERNETWORK_SUFFIXES:
                found.setdefault(path.stem, path)
    for name in sorted(registered(models_dir, HYPERNETWORK_DIR)):
        found.setdefault(Path(name).stem, root / name)
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))
