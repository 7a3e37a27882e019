"""Every random draw of a training comes from a generator seeded from (seed, purpose, index).

Why: step k must draw the same samples, template lines, tag order, timesteps, noise and dropout masks
whatever happened before it, so that a run resumed at step k continues exactly as the uninterrupted run
did. One generator per step (and one per image for its latent, one for the probe, one for previews) gives
that; nothing reads the process's global generators except dropout, which :func:`seeded_global_rng` pins to
the step's seed and restores afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

STEP = "step"
DROPOUT = "dropout"
LATENT = "latent"
PROBE = "probe"
PREVIEW = "preview"
INIT = "init"


def derived_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed for one purpose and index, independent of every other (seed, purpose, index)."""
    digest = hashlib.sha256(f"{int(seed)}:{purpose}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str, index: int = 0) -> torch.Generator:
    """A fresh CPU generator (draws are moved to the device afterwards, so a seed means the same on any GPU)."""
    return torch.Generator("cpu").manual_seed(derived_seed(seed, purpose, index))


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global CPU (and the device's CUDA) generator seeded with ``seed`` for the block, restored after it:
    dropout layers draw from them, and the process's other users must not see a training's draws."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield
