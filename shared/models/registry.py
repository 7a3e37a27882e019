"""The models folder, laid out like the WebUI's (`Stable-diffusion/`, `Lora/`, `VAE/`, `embeddings/`).

Only `.safetensors` files are ever loaded; pickle formats are listed as refused and
never opened. Names resolve strictly inside the folder.

A folder under `Stable-diffusion/` that holds a `model_index.json` is a diffusers folder: it is one
checkpoint, named by its relative path (no extension), and the files inside it are not listed on
their own. It is inspected here from its JSON files alone (no torch): which pipeline it is, whether
every model component has `.safetensors` weights (a folder with only `.bin` weights is refused
without opening them), and which weight files make up its hash (see `shared.webui.hashes.sha256_folder`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import FieldError
from shared.models.safetensors_header import safetensors_problem

CHECKPOINT_DIR = "Stable-diffusion"
LOADABLE_SUFFIXES = (".safetensors",)
REFUSED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]\s*$")
MODEL_INDEX = "model_index.json"
# diffusers pipeline class -> the architecture family the farm renders it as.
PIPELINE_ARCHITECTURES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
# Components whose weights are loaded, and the classes a folder may name for each part.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ALLOWED_COMPONENTS = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL")},
    "text_encoder": {("transformers", "CLIPTextModel")},
    "text_encoder_2": {("transformers", "CLIPTextModelWithProjection")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "tokenizer_2": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    # Never loaded by the farm (the safety checker is off), only tolerated in the index.
    "safety_checker": {("stable_diffusion", "StableDiffusionSafetyChecker")},
    "feature_extractor": {("transformers", "CLIPImageProcessor"), ("transformers", "CLIPFeatureExtractor")},
    "image_encoder": {("transformers", "CLIPVisionModelWithProjection")},
}


@dataclass(frozen=True)
class CheckpointFile:
    name: str  # relative path without extension, "/" separated: the WebUI's model_name
    filename: str  # relative path with extension
    path: Path
    size: int
    refused_reason: str | None = None

    @property
    def loadable(self) -> bool:
        return self.refused_reason is None

    @property
    def is_folder(self) -> bool:
        """A diffusers folder rather than a single file."""
        return self.path.is_dir()


@dataclass(frozen=True)
class DiffusersFolder:
    """What a diffusers folder's JSON files say; ``problem`` is why it cannot be loaded, if it cannot."""

    path: Path
    architecture: str | None
    pipeline_class: str | None
    weight_files: list[Path] = field(default_factory=list)
    problem: str | None = None

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _component_problem(folder: Path, name: str, entry: object) -> str | None:
    if entry is None or entry == [None, None]:
        return f"{name} is required" if name in ("unet", "vae", "text_encoder") else None
    scheduler = name == "scheduler" and isinstance(entry, list) and entry[:1] == ["diffusers"] and re.fullmatch(
        r"[A-Za-z0-9]+Scheduler", str(entry[-1])) is not None
    if not scheduler and not (isinstance(entry, list) and len(entry) == 2
                              and tuple(entry) in ALLOWED_COMPONENTS.get(name, set())):
        return f"component {name} {entry!r} is not one this farm loads"
    if name not in WEIGHT_COMPONENTS:
        return None
    sub = folder / name
    if not (sub / "config.json").is_file():
        return f"{name}/config.json is missing"
    if any(sub.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in REFUSED_SUFFIXES)
    if pickles:
        return (f"{name} has only pickle weights ({', '.join(pickles[:2])}), which can run code when loaded; "
                "only .safetensors weights are loaded")
    return f"{name} has no .safetensors weights"


def _unet_problem(folder: Path, architecture: str) -> str | None:
    try:
        unet = _read_json(folder / "unet" / "config.json")
    except (OSError, ValueError) as exc:
        return f"unet/config.json is unreadable ({exc})"
    if unet.get("in_channels") != 4:
        kind = "an inpainting model" if unet.get("in_channels") == 9 else f"a {unet.get('in_channels')}-channel UNet"
        return f"{kind} is not supported"
    if architecture == "sd15" and unet.get("cross_attention_dim") == 1024:
        return "Stable Diffusion 2.x models (cross_attention_dim 1024) are not supported"
    return None


def inspect_diffusers_folder(folder: Path) -> DiffusersFolder:
    """Read a diffusers folder's ``model_index.json`` and component configs; never opens a weight file."""
    folder = Path(folder)
    weights = sorted(folder.rglob("*.safetensors"), key=lambda p: p.relative_to(folder).as_posix())
    try:
        index = _read_json(folder / MODEL_INDEX)
    except (OSError, ValueError) as exc:
        return DiffusersFolder(folder, None, None, weights, f"{MODEL_INDEX} is unreadable ({exc})")
    pipeline = index.get("_class_name")
    architecture = PIPELINE_ARCHITECTURES.get(str(pipeline))
    if architecture is None:
        return DiffusersFolder(folder, None, str(pipeline), weights,
                               f"pipeline {pipeline!r} is not supported; only {', '.join(PIPELINE_ARCHITECTURES)}")
    names = [k for k in index if not k.startswith("_") and isinstance(index[k], list | type(None))]
    expected = ("unet", "vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2")
                                                               if architecture == "sdxl" else ())
    for name in dict.fromkeys([*expected, "scheduler", *names]):
        problem = _component_problem(folder, name, index.get(name))
        if problem is not None:
            return DiffusersFolder(folder, architecture, str(pipeline), weights, problem)
    return DiffusersFolder(folder, architecture, str(pipeline), weights, _unet_problem(folder, architecture))


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_INDEX).is_file()


def scan_checkpoints(models_dir: Path) -> list[CheckpointFile]:
    root = models_dir / CHECKPOINT_DIR
    found: list[CheckpointFile] = []
    if not root.is_dir():
        return _registered_checkpoints(models_dir, set())
    folders: list[Path] = []
    for path in sorted(root.rglob("*")):
        if any(path.is_relative_to(folder) for folder in folders):
            continue  # the parts of a diffusers folder are not checkpoints of their own
        if is_diffusers_folder(path):
            folders.append(path)
            info = inspect_diffusers_folder(path)
            rel = path.relative_to(root).as_posix()
            found.append(CheckpointFile(rel, rel, path, info.size, info.problem))
            continue
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix not in LOADABLE_SUFFIXES + REFUSED_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        if suffix in REFUSED_SUFFIXES:
            reason: str | None = f"{suffix} files are pickles that can run code when loaded; only .safetensors are " \
                                 "loaded"
        else:
            reason = safetensors_problem(path)
        found.append(CheckpointFile(rel[: -len(path.suffix)], rel, path, path.stat().st_size, reason))
    return found + _registered_checkpoints(models_dir, {c.filename for c in found})


def _registered_checkpoints(models_dir: Path, local: set[str]) -> list[CheckpointFile]:
    """The model store's checkpoints this folder does not hold (yet): a worker pulls them for a job that names
    them (shared/models/store_registry.py)."""
    from shared.models.store_registry import registered

    root = models_dir / CHECKPOINT_DIR
    return [CheckpointFile(filename.rsplit(".", 1)[0], filename, root / filename, record.size)
            for filename, record in sorted(registered(models_dir, CHECKPOINT_DIR).items()) if filename not in local]


# A submit names its checkpoint from a scan of the folder at most this old (per process): walking the folder twice
# cost a POST an eighth of its time (issue 20). A name the scan lacks is looked up afresh, and a scan that found
# nothing loadable is never reused, so a file just added is found at once; a file changed or removed is seen
# within this long (a job naming a removed one then fails on its worker).
RECENT_SCAN_SECONDS = 1.0
_recent_scans: dict[Path, tuple[float, list[CheckpointFile]]] = {}


def recent_checkpoints(models_dir: Path, fresh: bool = False) -> list[CheckpointFile]:
    """:func:`scan_checkpoints`, reused for ``RECENT_SCAN_SECONDS`` unless ``fresh`` or it found nothing loadable."""
    now = time.monotonic()
    cached = _recent_scans.get(models_dir)
    if (not fresh and cached is not None and now - cached[0] < RECENT_SCAN_SECONDS
            and any(c.loadable for c in cached[1])):
        return cached[1]
    found = scan_checkpoints(models_dir)
    _recent_scans[models_dir] = (now, found)
    return found


def default_checkpoint(models_dir: Path, configured: str | None) -> str | None:
    if configured:
        return configured
    loadable = [c for c in recent_checkpoints(models_dir) if c.loadable]
    return loadable[0].name if loadable else None


def resolve_checkpoint(
    models_dir: Path, requested: str, field: tuple[str | int, ...] = ("body", "model")
) -> CheckpointFile:
    """Find a checkpoint by name, file name or WebUI title (`name.safetensors [hash]`)."""
    name = _TITLE_HASH.sub("", requested.strip())
    if not name or name.startswith(("/", "\\")) or ".." in Path(name).parts or "\\" in name or "\x00" in name:
        raise FieldError(field, f"model {requested!r} is not a name inside the models folder")
    from shared.models.store_registry import refresh_for

    checkpoints = recent_checkpoints(models_dir)
    if not any(name in (c.name, c.filename) for c in checkpoints):
        checkpoints = recent_checkpoints(models_dir, fresh=True)  # added to the folder since the recent scan?
        if not any(name in (c.name, c.filename) for c in checkpoints) and refresh_for(models_dir):
            checkpoints = recent_checkpoints(models_dir, fresh=True)  # to the model store in the view's last second?
    for ckpt in checkpoints:
        if name in (ckpt.name, ckpt.filename):
            if not ckpt.loadable:
                raise FieldError(field, f"model {requested!r} is refused: {ckpt.refused_reason}")
            return ckpt
    available = ", ".join(c.name for c in checkpoints if c.loadable) or "none"
    raise FieldError(field, f"unknown model {requested!r}; available models: {available}")
