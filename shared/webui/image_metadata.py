"""The WebUI's infotext inside image files: written by the worker, read back by the API's png-info.

PNG carries it in a ``parameters`` text chunk; JPEG and WebP in EXIF UserComment, written as the
WebUI writes it through piexif (``UNICODE\\0`` + UTF-16 big-endian) and read as leniently as the
WebUI's ``read_info_from_image`` (other tools write little-endian or ASCII). Pillow only, no torch.
"""

from __future__ import annotations

import io
import logging

from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = [
    "EXIF_IFD",
    "EXIF_USER_COMMENT",
    "OUTPUT_FORMATS",
    "USER_COMMENT_UNICODE",
    "decode_user_comment",
    "encode_extras_image",
    "encode_image",
    "encode_png",
    "exif_infotext",
    "read_exif_infotext",
]

log = logging.getLogger(__name__)

# output_format -> (PIL format, file extension, content type)
OUTPUT_FORMATS = {
    "png": ("PNG", "png", "image/png"),
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
    "webp": ("WEBP", "webp", "image/webp"),
}
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_UNICODE = b"UNICODE\0"
JPEG_WEBP_QUALITY = 80  # the WebUI's default


def encode_png(image: Image.Image, infotext: str | None = None, *, compress_level: int | None = None) -> bytes:
    """PNG bytes; with ``infotext``, in a ``parameters`` text chunk, else no metadata at all.

    ``compress_level`` None is Pillow's default (what the outputs have always been written with).
    """
    options: dict[str, object] = {}
    if infotext is not None:
        info = PngInfo()
        info.add_text("parameters", infotext)
        options["pnginfo"] = info
    if compress_level is not None:
        options["compress_level"] = compress_level
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def encode_image(image: Image.Image, infotext: str, output_format: str = "png") -> bytes:
    """PNG keeps the ``parameters`` chunk; JPEG/WebP (quality 80, the WebUI's default) carry the infotext in
    EXIF UserComment exactly as the WebUI writes it through piexif: ``UNICODE\\0`` + UTF-16 big-endian."""
    if output_format not in ("jpeg", "webp"):
        return encode_png(image, infotext)
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = USER_COMMENT_UNICODE + infotext.encode("utf_16_be")
    pil_format = OUTPUT_FORMATS[output_format][0]
    buffer = io.BytesIO()
    try:
        image.convert("RGB").save(buffer, format=pil_format, quality=JPEG_WEBP_QUALITY, exif=exif.tobytes())
    except ValueError:
        # A JPEG segment holds at most 64 KiB, and UTF-16 doubles the text: a prompt of ~30000 characters
        # does not fit. The image is still worth having; its infotext stays on the job's image record.
        log.warning("infotext of %d characters does not fit in JPEG EXIF; image saved without it", len(infotext))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=pil_format, quality=JPEG_WEBP_QUALITY)
    return buffer.getvalue()


def encode_extras_image(image: Image.Image, postprocessing: str, parameters: str | None,
                        output_format: str = "png") -> bytes:
    """An Extras output as the WebUI saves it: a PNG keeps the source's ``parameters`` and adds the
    ``postprocessing`` text (and the same text as ``extras``, as ``save_image`` writes it); JPEG and WebP carry
    only ``parameters`` in the EXIF comment, as the WebUI's API encodes them."""
    if output_format in ("jpeg", "webp"):
        return encode_image(image, parameters or "", output_format)
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    if postprocessing:
        info.add_text("postprocessing", postprocessing)
        info.add_text("extras", postprocessing)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: an 8-byte charset header, then text (piexif's ``UserComment.load``, more lenient).

    The WebUI writes ``UNICODE\\0`` + UTF-16 big-endian; some tools write little-endian, which shows as
    zero bytes in the odd positions, so the byte order is taken from where the zeros are.
    """
    if isinstance(raw, str):
        return raw
    header, body = raw[:8], raw[8:]
    if header == USER_COMMENT_UNICODE:
        little = len(body) >= 2 and body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if little else "utf-16-be", errors="ignore")
    if header in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", errors="ignore")
    return raw.decode("utf-8", errors="ignore")


def exif_infotext(image: Image.Image) -> str | None:
    """The infotext in an opened image's EXIF UserComment, or None when it has none."""
    comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    return decode_user_comment(comment) if comment else None


def read_exif_infotext(data: bytes) -> str | None:
    """The infotext in a JPEG/WebP file's EXIF UserComment (trusted bytes: the farm's own outputs)."""
    with Image.open(io.BytesIO(data)) as image:
        return exif_infotext(image)
