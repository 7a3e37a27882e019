"""Preprocessors that need annotator weights: which ones the workers run, and whether their weights are installed.

Annotator weights live in ``models/ControlNet/annotators/<folder>/`` under the file names the extension uses
(``hed/ControlNetHED.pth``); a ``.safetensors`` file of the same stem is taken first. Nothing is ever downloaded.
A module with weights is available to jobs when the workers implement it (:data:`WORKER_ANNOTATORS`, the one list
the torch-free API and the worker share) and every weight file is present; the API refuses the others with a 422
listing what runs. The networks run on the worker (:mod:`worker.engine.annotators`): they need torch, and the GPU.

Implemented: HED (``softedge_hed``, ``softedge_hedsafe``, ``scribble_hed``; lllyasviel's Apache-2.0 network).
Not yet: MiDaS depth, OpenPose and the rest; their maintained loader (controlnet-aux) needs torchvision, which
does not load beside this project's CPU build of torch 2.13 (moving to torch 2.14.1 + torchvision 0.29.1 is the
way through, see the upscalers issue).
"""

from __future__ import annotations

from pathlib import Path

from shared.controlnet.models import ANNOTATORS_DIR, CONTROLNET_DIR
from shared.controlnet.preprocessors import Preprocessor

__all__ = ["WORKER_ANNOTATORS", "annotator_available", "annotators_dir", "weight_file"]

WORKER_ANNOTATORS = frozenset({"hed", "hed_safe", "scribble_hed"})


def annotators_dir(models_dir: Path) -> Path:
    return Path(models_dir) / CONTROLNET_DIR / ANNOTATORS_DIR


def weight_file(models_dir: Path, relative: str) -> Path | None:
    """The installed file for an annotator weight (``hed/ControlNetHED.pth``): its ``.safetensors`` twin first."""
    path = annotators_dir(models_dir) / relative
    for candidate in (path.with_suffix(".safetensors"), path):
        if candidate.is_file():
            return candidate
    return None


def annotator_available(module: Preprocessor, models_dir: Path) -> bool:
    return (module.runnable and module.name in WORKER_ANNOTATORS and bool(module.weight_files)
            and all(weight_file(models_dir, name) is not None for name in module.weight_files))
