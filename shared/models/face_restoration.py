"""The files of the WebUI's GFPGAN face restoration, found in the models folder; torch-free.

The WebUI (``modules/gfpgan_model.py``) takes the GFPGAN network from ``models/GFPGAN``: the first ``.pth``
file, in its natural sort order over the folder and its subfolders (``modelloader.load_models`` ->
``util.walk_files``), whose name contains ``GFPGAN`` (``GFPGANv1.4.pth`` when it downloads one). facexlib's two
helper networks are read from the same folder (``face_restoration_utils.patch_facexlib`` points facexlib's
downloads there): the RetinaFace detector ``detection_Resnet50_Final.pth`` and the ParseNet face parser
``parsing_parsenet.pth``. The farm downloads nothing, so all three must be there; it also takes ``.safetensors``:
a GFPGAN file may be one, and a ``.safetensors`` file with the same stem as a chosen ``.pth`` (the detector's,
the parser's or the GFPGAN file's) is taken in its place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FieldError

__all__ = [
    "DETECTOR_FILE",
    "GFPGAN_DIR",
    "GFPGAN_MARKER",
    "PARSER_FILE",
    "FaceRestorationFiles",
    "face_restoration_files",
]

GFPGAN_DIR = "GFPGAN"
DETECTOR_FILE = "detection_Resnet50_Final.pth"
PARSER_FILE = "parsing_parsenet.pth"
GFPGAN_MARKER = "GFPGAN"  # gfpgan_model.py load_net: `if 'GFPGAN' in os.path.basename(model_path)`
GFPGAN_SUGGESTED = "GFPGANv1.4.pth"  # what the WebUI downloads (TencentARC/GFPGAN release v1.3.0)
_SUFFIXES = (".pth", ".safetensors")
_DIGITS = re.compile(r"([0-9]+)")


@dataclass(frozen=True)
class FaceRestorationFiles:
    """The three files face restoration needs."""

    gfpgan: Path
    detector: Path
    parser: Path


def _natural_key(text: str) -> list[int | str]:
    """``modules/util.py:natural_sort_key``: digit runs compare as numbers, the rest case-insensitively."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(text)]


def _twin(path: Path) -> Path:
    """The ``.safetensors`` file beside ``path`` with its stem, when there is one; else ``path``."""
    twin = path.with_suffix(".safetensors")
    return twin if twin.is_file() else path


def _gfpgan_file(folder: Path) -> Path | None:
    candidates = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES
                  and GFPGAN_MARKER in p.name]
    if not candidates:
        return None
    # walk_files: folders in natural order of their path, files in natural order within each folder
    first = min(candidates, key=lambda p: (_natural_key(p.parent.relative_to(folder).as_posix()), _natural_key(p.name)))
    return _twin(first) if first.suffix.lower() == ".pth" else first


def face_restoration_files(models_dir: Path) -> FaceRestorationFiles | str:
    """The GFPGAN, detector and parser files in ``models_dir/GFPGAN``, or a reason naming what is missing."""
    folder = Path(models_dir) / GFPGAN_DIR
    if not folder.is_dir():
        return (f"face restoration needs models/{GFPGAN_DIR}/ with {GFPGAN_SUGGESTED}, {DETECTOR_FILE} and "
                f"{PARSER_FILE}; models/{GFPGAN_DIR}/ does not exist")
    gfpgan = _gfpgan_file(folder)
    detector = _twin(folder / DETECTOR_FILE)
    parser = _twin(folder / PARSER_FILE)
    missing = []
    if gfpgan is None:
        missing.append(f"put {GFPGAN_SUGGESTED} (or another .pth/.safetensors file whose name contains "
                       f"{GFPGAN_MARKER!r}) in models/{GFPGAN_DIR}/")
    for path, what in ((detector, "facexlib's RetinaFace face detector"), (parser, "facexlib's ParseNet face parser")):
        if not path.is_file():
            stem = path.stem
            missing.append(f"put {stem}.pth ({what}; or {stem}.safetensors) in models/{GFPGAN_DIR}/")
    if missing or gfpgan is None:
        return "face restoration is unavailable: " + "; ".join(missing)
    return FaceRestorationFiles(gfpgan=gfpgan, detector=detector, parser=parser)


def check_face_restoration(models_dir: Path, field: tuple[str | int, ...]) -> FaceRestorationFiles:
    """The face restoration files, or a FieldError naming ``field`` and what is missing (a 422 before anything
    is stored, rather than a job that can only fail)."""
    found = face_restoration_files(models_dir)
    if isinstance(found, str):
        raise FieldError(field, f"face restoration (GFPGAN) is not available: {found}")
    return found
