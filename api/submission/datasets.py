"""A training dataset checked before anything of it is unpacked or stored (issue 15).

A dataset is images with optional same-named ``.txt`` captions (``a.png`` + ``a.txt``, as the WebUI's and kohya's
``[filewords]`` read them), sent as one zip or as several files. Everything is checked from what the request
declares before a byte is decompressed: entry names (no absolute paths, ``..``, backslashes, links), kinds (images
and captions only; macOS's ``__MACOSX/`` and ``.DS_Store`` are skipped), counts, the declared unpacked size and each
entry's compression ratio (a zip bomb declares a tiny entry that inflates a thousandfold), encryption. Then each
entry is read no further than it declared, and each image decoded under the farm's pixel limit, as any input image
is. A refusal is a FieldError whose location names the entry: ``["body", "file", "<entry>"]``.
"""

from __future__ import annotations

import functools
import stat
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from api.submission.images import checked_png, decode_image, for_init_image
from shared.errors import FieldError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 64 * 1024
_SKIPPED = ("__MACOSX/",)
_SKIPPED_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass(frozen=True)
class DatasetLimits:
    max_images: int
    max_unpacked_bytes: int
    max_ratio: float
    max_pixels: int


@dataclass(frozen=True)
class DatasetImage:
    name: str  # its path in the zip (or the uploaded file's name), "/" separated
    png: bytes  # re-encoded, no metadata
    width: int
    height: int
    caption: str | None


Entry = tuple[str, str, Callable[[], bytes]]  # (name, "image" or "caption", read its bytes)


def _field(name: str) -> tuple[str, ...]:
    return ("body", "file", name)


def check_entry_name(name: str) -> str:
    """The entry's name if it is a plain relative path (what unpacking it could not turn into an escape)."""
    path = PurePosixPath(name)
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or ".." in path.parts
            or (path.parts and ":" in path.parts[0])):
        raise FieldError(_field(name), f"{name!r} is not a relative path inside the dataset (absolute paths, '..', "
                                       "backslashes and drive letters are refused)")
    return name


def _kept(name: str) -> bool:
    return not name.startswith(_SKIPPED) and PurePosixPath(name).name not in _SKIPPED_NAMES \
        and not PurePosixPath(name).name.startswith("._")


def _kind(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix == CAPTION_SUFFIX:
        return "caption"
    raise FieldError(_field(name), f"{name!r} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a caption (.txt)")


def read_zip(file: BinaryIO, limits: DatasetLimits) -> list[DatasetImage]:
    """The images and captions of a zip, every entry checked from the central directory before any is read."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FieldError(("body", "file"), f"not a readable zip file: {exc}") from exc
    with archive:
        entries = []
        declared = 0
        for info in archive.infolist():
            if info.is_dir() or not _kept(info.filename):
                continue
            name = check_entry_name(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise FieldError(_field(name), f"{name!r} is a symbolic link; a dataset holds files only")
            if info.flag_bits & 0x1:
                raise FieldError(_field(name), f"{name!r} is encrypted; send the dataset without a password")
            kind = _kind(name)
            if kind == "caption" and info.file_size > MAX_CAPTION_BYTES:
                raise FieldError(_field(name), f"the caption {name!r} is over {MAX_CAPTION_BYTES} bytes")
            if info.file_size > max(info.compress_size, 1) * limits.max_ratio and info.file_size > 1024 * 1024:
                raise FieldError(_field(name), f"{name!r} inflates {info.compress_size} bytes to {info.file_size} "
                                               f"(over {limits.max_ratio:g}x): refused as a zip bomb")
            declared += info.file_size
            if declared > limits.max_unpacked_bytes:
                raise FieldError(_field(name), f"the dataset unpacks to more than {limits.max_unpacked_bytes} bytes "
                                               f"(at {name!r})")
            entries.append((name, info, kind))

        def read(name: str, info: zipfile.ZipInfo) -> bytes:
            try:
                with archive.open(info) as handle:
                    data = handle.read(info.file_size + 1)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                raise FieldError(_field(name), f"{name!r} could not be read from the zip: {exc}") from exc
            if len(data) > info.file_size:
                raise FieldError(_field(name), f"{name!r} holds more than the {info.file_size} bytes it declares")
            return data

        return collect([(name, kind, functools.partial(read, name, info)) for name, info, kind in entries], limits)


def read_files(files: Iterable[tuple[str, bytes]], limits: DatasetLimits) -> list[DatasetImage]:
    """The images and captions sent as separate files (each by its file name)."""
    listed: list[Entry] = []
    for raw_name, data in files:
        name = check_entry_name(PurePosixPath(raw_name.replace("\\", "/")).name or raw_name)
        if _kept(name):
            listed.append((name, _kind(name), functools.partial(bytes, data)))
    return collect(listed, limits)


def collect(entries: Iterable[Entry], limits: DatasetLimits) -> list[DatasetImage]:
    """Pair images with their captions (same path, ``.txt``), decode and re-encode each image."""
    images: dict[str, tuple[str, Callable[[], bytes]]] = {}
    captions: dict[str, tuple[str, Callable[[], bytes]]] = {}
    for name, kind, read in entries:
        stem = str(PurePosixPath(name).with_suffix(""))
        found = images if kind == "image" else captions
        if stem in found:
            raise FieldError(_field(name), f"{name!r} and {found[stem][0]!r} have the same name; captions pair with "
                                           "images by name, so each may appear once")
        found[stem] = (name, read)
    for stem, (name, _) in captions.items():
        if stem not in images:
            raise FieldError(_field(name), f"the caption {name!r} has no image of the same name")
    if not images:
        raise FieldError(("body", "file"), "the dataset holds no image")
    if len(images) > limits.max_images:
        raise FieldError(("body", "file"), f"the dataset holds {len(images)} images, over the limit of "
                                           f"{limits.max_images}")
    checked = []
    for stem, (name, read) in sorted(images.items()):
        image = decode_image(read(), _field(name), limits.max_pixels)
        png = checked_png(for_init_image(image) if image.mode not in ("RGB", "L") else image.convert("RGB"))
        caption = None
        if stem in captions:
            caption_name, read_caption = captions[stem]
            try:
                caption = read_caption().decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise FieldError(_field(caption_name), f"the caption {caption_name!r} is not UTF-8 text") from exc
        checked.append(DatasetImage(name, png.png, png.width, png.height, caption))
    return checked


__all__ = ["DatasetImage", "DatasetLimits", "check_entry_name", "read_files", "read_zip"]
