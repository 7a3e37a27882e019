"""Checkpoint loading for the GPU worker: single-file SD checkpoints, bundled configs, key layouts.

Why a package of its own: everything here must work with no model hub in reach, and it is the
only place that knows how original (LDM / WebUI) checkpoint files map onto diffusers pipelines.
Header-only helpers (architecture detection) do not import diffusers, so the worker can vet a
model folder cheaply before it loads anything.
"""

from worker.engine.checkpoint_loader import (
    UnsupportedCheckpointError,
    checkpoint_config_dir,
    detect_architecture,
    load_pipeline,
)

__all__ = [
    "UnsupportedCheckpointError",
    "checkpoint_config_dir",
    "detect_architecture",
    "load_pipeline",
]
