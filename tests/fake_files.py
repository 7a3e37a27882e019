"""Stand-in model files for tests that need a file's name, size or hash, not its weights.

A ``.safetensors`` stand-in must still be a real safetensors file: the registries refuse, unopened, a file whose
header does not parse (a pickle renamed ``.safetensors``). ``as_safetensors`` wraps any bytes as one ``U8``
tensor, so different payloads still give different files and hashes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def as_safetensors(payload: bytes, metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"payload": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def write_model_file(path: Path, payload: bytes) -> Path:
    """``payload`` as is, or wrapped in a safetensors file when ``path`` ends in ``.safetensors``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(as_safetensors(payload) if path.suffix == ".safetensors" else payload)
    return path
