"""The text chunks of a PNG, read with the standard library only (no server, no Pillow).

The farm, like the WebUI, writes a job's infotext into a ``tEXt`` (or ``iTXt``) chunk named ``parameters``.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class NotAPng(ValueError):
    """The file is not a PNG (or is cut short)."""


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """Every text chunk (tEXt, zTXt, iTXt) of the PNG at ``path``, keyword to text, in file order."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise NotAPng(f"{path} is not a PNG file")
    texts: dict[str, str] = {}
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if len(body) < length:
            raise NotAPng(f"{path} is cut short inside its {kind.decode('latin-1')} chunk")
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _text_chunk(kind, body)
            texts[keyword] = text
        elif kind == b"IEND":
            break
        offset += 12 + length  # length, type, data, CRC
    return texts


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    keyword, _, rest = body.partition(b"\0")
    name = keyword.decode("latin-1")
    try:
        if kind == b"tEXt":
            return name, rest.decode("latin-1")
        if kind == b"zTXt":  # compression method byte, then zlib data
            return name, zlib.decompress(rest[1:]).decode("latin-1")
        compressed, _method = rest[0], rest[1]  # iTXt: flag, method, language\0, translated keyword\0, text
        _language, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        return name, (zlib.decompress(text) if compressed else text).decode("utf-8")
    except (IndexError, zlib.error, UnicodeDecodeError) as exc:
        raise NotAPng(f"its {kind.decode()} chunk {name!r} does not decode: {exc}") from exc
