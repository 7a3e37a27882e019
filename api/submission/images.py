"""Input images (img2img, masks, uploads, png-info): decoded only after their header passed every check.

An image is untrusted bytes that can cost far more to decode than to send: a few hundred bytes of
PNG can claim 30000x30000 pixels (a decompression bomb) and a truncated file can crash a decoder.
So the header is read first, with Pillow restricted to the formats we accept, and the claimed size is
checked against the farm's own pixel limit (never only against Pillow's process-wide
``Image.MAX_IMAGE_PIXELS``, which any library may loosen). Only then are pixels decoded. Every
failure is a FieldError naming the request field, so the API answers 422 and enqueues nothing.

Accepted inputs are re-encoded to plain PNG (no metadata carried over), so what a worker reads is
always a well-formed image in a known mode.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import FieldError
from shared.webui.image_metadata import encode_png, exif_infotext

__all__ = [
    "ACCEPTED_FORMATS",
    "CheckedImage",
    "ImageHeader",
    "checked_png",
    "decode_base64_image",
    "decode_image",
    "for_init_image",
    "for_mask",
    "for_upload",
    "probe_image",
    "read_generation_info",
]

log = logging.getLogger(__name__)
Field = tuple[str | int, ...]

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class CheckedImage:
    """A validated image, re-encoded as PNG."""

    png: bytes
    width: int
    height: int


def decode_base64_image(text: str, field: Field, max_bytes: int) -> bytes:
    """Bytes of a base64 image, with or without a ``data:image/...;base64,`` prefix (as the WebUI accepts).

    The length is checked before decoding, so an oversized string costs no memory beyond itself.
    """
    text = text.strip()
    prefix = _DATA_URL.match(text)
    if prefix is not None:
        text = text[prefix.end():]
    elif text.startswith("data:"):
        raise FieldError(field, "only base64 data URLs of images are accepted (data:image/<type>;base64,...)")
    text = "".join(text.split())  # clients that wrap base64 at 76 columns
    if not text:
        raise FieldError(field, "the image is empty")
    if len(text) > (max_bytes + 2) // 3 * 4:
        raise FieldError(field, f"the image is larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FieldError(field, f"not valid base64 image data ({exc}); send base64 or an upload:<id> reference") \
            from exc


def _open(data: bytes, field: Field) -> Image.Image:
    if not data:
        raise FieldError(field, "the image is empty")
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise FieldError(field, f"refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise FieldError(field, f"not a readable image; accepted formats: {', '.join(ACCEPTED_FORMATS)}") from exc
    except Exception as exc:  # Pillow's plugins raise many types on malformed headers
        raise FieldError(field, f"corrupt image header ({type(exc).__name__}: {exc})") from exc


def _check_size(image: Image.Image, field: Field, max_pixels: int, data_len: int) -> ImageHeader:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise FieldError(field, f"corrupt image header: it claims {width}x{height} pixels")
    pixels = width * height
    if pixels > max_pixels:
        bomb = " (a decompression bomb: a small file that claims a huge image)" if pixels > 1000 * data_len else ""
        raise FieldError(
            field, f"the image claims {width}x{height} = {pixels} pixels, over the limit of {max_pixels}{bomb}"
        )
    return ImageHeader(str(image.format), width, height, image.mode)


def probe_image(data: bytes, field: Field, max_pixels: int) -> ImageHeader:
    """Format, size and mode from the header alone; no pixel is decoded."""
    with _open(data, field) as image:
        return _check_size(image, field, max_pixels, len(data))


def _load(data: bytes, field: Field, max_pixels: int) -> Image.Image:
    """The first frame's pixels, decoded only after the header passed every check."""
    image = _open(data, field)
    try:
        _check_size(image, field, max_pixels, len(data))
        image.load()
    except FieldError:
        image.close()
        raise
    except Exception as exc:  # truncated data, bad zlib stream, broken JPEG...
        image.close()
        raise FieldError(field, f"corrupt image data ({type(exc).__name__}: {exc})") from exc
    return image


def decode_image(data: bytes, field: Field, max_pixels: int) -> Image.Image:
    """The first frame's pixels, upright (EXIF orientation applied), after the header passed every check."""
    image = _load(data, field, max_pixels)
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not cost the user the image
        log.warning("ignoring unreadable EXIF orientation in %s: %s", field, exc)
        upright = image
    if upright.width * upright.height > max_pixels:  # defensive: transposing never adds pixels
        raise FieldError(field, f"the image has more than {max_pixels} pixels")
    return upright


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def for_init_image(image: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white as the WebUI does (its default background colour)."""
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def for_mask(image: Image.Image) -> Image.Image:
    """Greyscale, the WebUI's rule: a mask with real transparency is its alpha channel, rounded to 0/255."""
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[-1] != (255, 255):
            return rgba.getchannel("A").point(lambda value: 255 if value > 128 else 0)
    return image.convert("L")


def for_upload(image: Image.Image) -> Image.Image:
    """Keep what an upload may later be used as (init image or mask): greyscale, RGB or RGBA."""
    if _has_alpha(image):
        return image.convert("RGBA")
    if image.mode in ("1", "L", "I", "I;16", "F"):
        return image.convert("L")
    return image.convert("RGB")


def checked_png(image: Image.Image) -> CheckedImage:
    """Plain PNG without metadata; fast compression, since inputs are read once by a worker."""
    return CheckedImage(encode_png(image, compress_level=1), image.width, image.height)


# Metadata keys that are not generation info (the WebUI's IGNORED_INFO_KEYS in modules/images.py).
_IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
})


def _json_safe(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="ignore")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_json_safe(item) for item in value]
    return str(value)


def read_generation_info(data: bytes, field: Field, max_pixels: int) -> tuple[str, dict[str, object]]:
    """(infotext, other metadata) of an image, as the WebUI's ``read_info_from_image`` returns them.

    The infotext is the PNG ``parameters`` text chunk, or the EXIF UserComment of a JPEG or WebP
    (which wins, as in the WebUI; decoded by :mod:`shared.webui.image_metadata`). The image is
    decoded because PNG text chunks may follow the pixel data; the header checks run first as for
    any input.
    """
    with _load(data, field, max_pixels) as image:
        items: dict[str | tuple[int, int], object] = dict(image.info or {})
        decoded = exif_infotext(image)
    geninfo = items.pop("parameters", "")
    text = geninfo.decode("utf-8", errors="ignore") if isinstance(geninfo, bytes) else str(geninfo)
    if decoded:
        items["exif comment"] = decoded
        text = decoded
    for key in _IGNORED_INFO_KEYS:
        items.pop(key, None)
    return text, {str(key): _json_safe(value) for key, value in items.items()}
