"""Reading a weights file without running pickled code: ``.safetensors``, or ``.pth``/``.pt`` through torch's
weights-only unpickler (tensors and plain containers only). One reader for the upscalers and the face restorer;
each turns :class:`UnreadableWeights` into its own refusal."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

__all__ = ["PICKLE_SUFFIXES", "UnreadableWeights", "first_line", "read_weights"]

PICKLE_SUFFIXES = (".pth", ".pt")


class UnreadableWeights(Exception):
    """``reason`` names the file and says why it cannot be read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _unpickler_detail(exc: BaseException) -> str:
    """The useful line of torch's weights-only refusal ("Unsupported global: GLOBAL posix.system ...")."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        lines = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if lines:
            return lines[0][:300]
    return first_line(exc)


def read_weights(path: Path) -> dict[object, object]:
    """The file's top-level mapping; raises UnreadableWeights (FileNotFoundError when the file is gone)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UnreadableWeights(f"{path.name}: not a readable .safetensors file ({first_line(exc)})") from exc
    if suffix in PICKLE_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = _unpickler_detail(exc)
            if detail.startswith("Unsupported global"):
                raise UnreadableWeights(
                    f"{path.name}: refused: its pickle holds objects other than tensors and plain containers, "
                    f"which are never unpickled here (torch's weights-only unpickler: {detail})") from exc
            raise UnreadableWeights(f"{path.name}: not a readable {suffix} file ({detail})") from exc
        except FileNotFoundError:
            raise
        except Exception as exc:  # a broken zip, a truncated or foreign file, a TorchScript archive, ...
            raise UnreadableWeights(f"{path.name}: not a readable {suffix} file ({first_line(exc)})") from exc
        if not isinstance(loaded, dict):
            raise UnreadableWeights(f"{path.name}: holds a {type(loaded).__name__}, not a state dict")
        return dict(loaded)
    raise UnreadableWeights(f"{path.name}: unsupported file type {suffix or '(none)'!r}; expected .pth, .pt or "
                            ".safetensors")
