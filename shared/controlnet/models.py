"""ControlNet model files: where they live, what they are called, what they are (from the header alone).

The ControlNet extension reads ``models/ControlNet/`` and its own ``extensions/sd-webui-controlnet/models/``
(beside the WebUI's ``models/`` folder, so here under the models root's parent), and lists every file as
``"<file stem> [<hash>]"``, the hash being the WebUI's pre-2023 ``model_hash`` (8 hex of the 64 KiB at
1 MiB; ``global_state.get_all_models``). Clients send that title back in a unit's ``model``; infotexts carry it.

Only ``.safetensors`` files and diffusers folders (``config.json`` beside
``diffusion_pytorch_model.safetensors``) are loadable. Pickles (``.pth``, ``.pt``, ``.ckpt``, ``.bin``) are
listed as refused and never opened. ``annotators/`` holds preprocessor weights, not ControlNets.

What a file is comes from its safetensors header (the API is torch-free; the worker's loader uses the same
detector): the extension's ``control_model.*`` layout (lllyasviel's ``cldm``), or a single file already in
diffusers' names; SD1.x (768-wide cross-attention) or SDXL (``label_emb`` / ``add_embedding``); our demo models
carry a metadata tag. Control-LoRAs, T2I-Adapters and SD2.x ControlNets are refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FieldError
from shared.models.architecture import METADATA_ARCH_KEY
from shared.models.registry import LOADABLE_SUFFIXES, REFUSED_SUFFIXES
from shared.models.safetensors_header import SafetensorsHeader, safetensors_header_or_none
from shared.webui.hashes import legacy_model_hash

__all__ = [
    "CONTROLNET_DIR",
    "ControlNetDetection",
    "ControlNetFile",
    "detect_controlnet",
    "list_controlnets",
    "resolve_controlnet",
]

CONTROLNET_DIR = "ControlNet"
ANNOTATORS_DIR = "annotators"
EXTENSION_MODELS = Path("extensions") / "sd-webui-controlnet" / "models"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEMO_ARCHITECTURES = {"demo-tiny": "sd15", "demo-tiny-sdxl": "sdxl"}

# Probe keys: diffusers names, and the extension's layout (with or without its ``control_model.`` prefix).
_DIFFUSERS_HINT = "controlnet_cond_embedding.conv_in.weight"
_DIFFUSERS_SDXL = "add_embedding.linear_1.weight"
_DIFFUSERS_CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
_LDM_HINT = "input_hint_block.0.weight"
_LDM_SDXL = "label_emb.0.0.weight"
_LDM_CROSS = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class ControlNetDetection:
    """``architecture``: "sd15" / "sdxl" / a demo architecture, or None; ``layout``: "ldm" or "diffusers";
    ``problem``: why the farm cannot load it (None when it can)."""

    architecture: str | None
    layout: str | None
    problem: str | None = None

    @property
    def family(self) -> str | None:
        """"sd15" or "sdxl": the checkpoints this ControlNet works with."""
        if self.architecture is None:
            return None
        return DEMO_ARCHITECTURES.get(self.architecture, self.architecture)


def detect_controlnet(header: SafetensorsHeader, name: str) -> ControlNetDetection:
    """What a ControlNet file is, from its header's keys, shapes and metadata."""
    shapes = header.shapes
    if _DIFFUSERS_HINT in shapes:
        layout, sdxl_key, cross_key, prefix = "diffusers", _DIFFUSERS_SDXL, _DIFFUSERS_CROSS, ""
    else:
        prefix = "control_model." if f"control_model.{_LDM_HINT}" in shapes else ""
        if f"{prefix}{_LDM_HINT}" not in shapes:
            if any("lora_controlnet" in key for key in shapes) or any(".down." in key and "lora" in key
                                                                        for key in shapes):
                return ControlNetDetection(None, None, f"{name}: Control-LoRA files are not supported")
            return ControlNetDetection(None, None, (
                f"{name}: not a ControlNet (no {_DIFFUSERS_HINT} or control_model.{_LDM_HINT}); "
                "T2I-Adapters, IP-Adapters and ControlLLLite files are not supported"))
        layout, sdxl_key, cross_key = "ldm", _LDM_SDXL, _LDM_CROSS
    tagged = header.metadata.get(METADATA_ARCH_KEY)
    if tagged is not None:
        if tagged not in DEMO_ARCHITECTURES:
            return ControlNetDetection(None, layout, f"{name}: unknown {METADATA_ARCH_KEY} {tagged!r}")
        return ControlNetDetection(tagged, layout)
    if f"{prefix}{sdxl_key}" in shapes:
        return ControlNetDetection("sdxl", layout)
    cross = shapes.get(f"{prefix}{cross_key}")
    if cross is not None and cross[-1:] != (768,):
        return ControlNetDetection(None, layout, (
            f"{name}: a ControlNet with {cross[-1]}-wide cross-attention (SD2.x?) is not supported; "
            "only SD1.x (768) and SDXL"))
    return ControlNetDetection("sd15", layout)


@dataclass(frozen=True)
class ControlNetFile:
    """One ControlNet: ``title`` is what the extension lists (``name [hash]``); ``location`` is the path
    relative to the models root's parent, e.g. ``models/ControlNet/x.safetensors`` (what a job stores)."""

    name: str
    title: str
    location: str
    path: Path
    size: int
    hash: str | None
    architecture: str | None
    family: str | None
    layout: str | None
    refused_reason: str | None

    @property
    def loadable(self) -> bool:
        return self.refused_reason is None


def _roots(models_dir: Path) -> list[Path]:
    roots = [models_dir / CONTROLNET_DIR]
    extension = models_dir.parent / EXTENSION_MODELS
    if extension.is_dir() and extension.resolve() != roots[0].resolve():
        roots.append(extension)
    return roots


def _candidates(root: Path) -> list[Path]:
    """Files and diffusers folders under ``root``, skipping ``annotators/`` and files inside diffusers folders."""
    if not root.is_dir():
        return []
    found: list[Path] = []
    folders = sorted(p.parent for p in root.rglob("config.json") if (p.parent / DIFFUSERS_WEIGHTS).is_file()
                     or any(p.parent.glob("diffusion_pytorch_model*")))
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts and relative.parts[0] == ANNOTATORS_DIR:
            continue
        if any(folder in path.parents for folder in folders):
            continue
        if path in folders or (path.is_file() and path.suffix.lower() in LOADABLE_SUFFIXES + REFUSED_SUFFIXES):
            found.append(path)
    return found


def _describe(path: Path, root: Path, models_dir: Path) -> ControlNetFile:
    base = models_dir.parent
    location = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    name = path.name if path.is_dir() else path.stem
    if path.is_dir():
        weights = path / DIFFUSERS_WEIGHTS
        problem = None if weights.is_file() else (
            f"{path.name}: a diffusers folder without {DIFFUSERS_WEIGHTS} (.bin weights are pickles, never opened)")
        header = safetensors_header_or_none(weights) if problem is None else None
        detection = _folder_detection(path, header) if header is not None else ControlNetDetection(None, None, problem)
        digest = legacy_model_hash(weights) if problem is None else None
    elif path.suffix.lower() in REFUSED_SUFFIXES:
        detection = ControlNetDetection(None, None, (
            f"{path.suffix.lower()} files are pickles that can run code when loaded; convert it to .safetensors "
            "(only .safetensors files are loaded)"))
        digest = None
    else:
        header = safetensors_header_or_none(path)
        detection = detect_controlnet(header, path.name) if header is not None else ControlNetDetection(
            None, None, f"{path.name}: not a readable .safetensors file")
        digest = legacy_model_hash(path)
    title = f"{name} [{digest}]" if digest else name
    return ControlNetFile(name=name, title=title, location=location, path=path, size=size, hash=digest,
                          architecture=detection.architecture, family=detection.family, layout=detection.layout,
                          refused_reason=detection.problem)


def _folder_detection(folder: Path, header: SafetensorsHeader) -> ControlNetDetection:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ControlNetDetection(None, "folder", f"{folder.name}: unreadable config.json")
    if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
        return ControlNetDetection(None, "folder", f"{folder.name}: config.json is not a ControlNetModel's")
    found = detect_controlnet(header, folder.name)
    return ControlNetDetection(found.architecture, "folder", found.problem)


def list_controlnets(models_dir: Path) -> list[ControlNetFile]:
    """Every ControlNet in both folders, refused ones included (with the reason), and the model store's that this
    machine does not hold (yet), in the extension's order."""
    from shared.models.store_registry import registered

    models_dir = Path(models_dir)
    entries = []
    for root in _roots(models_dir):
        entries += [_describe(path, root, models_dir) for path in _candidates(root)]
    here = {entry.path.resolve() for entry in entries}
    for name, record in registered(models_dir, CONTROLNET_DIR).items():
        path = models_dir / CONTROLNET_DIR / name
        if path.resolve() in here:
            continue
        stem = Path(name).name.rsplit(".", 1)[0]
        detection = ControlNetDetection(record.architecture, record.details.get("layout"))
        entries.append(ControlNetFile(
            name=stem, title=f"{stem} [{record.legacy_hash}]", location=path.relative_to(models_dir.parent).as_posix(),
            path=path, size=record.size, hash=record.legacy_hash, architecture=record.architecture,
            family=detection.family, layout=detection.layout, refused_reason=None))
    return sorted(entries, key=lambda entry: entry.title.lower())


def controlnet_path(models_dir: Path, location: str) -> Path:
    """The file a job's ControlNet ``location`` (relative to the models folder's parent, as the API resolved it)
    names on this machine. A worker whose models folder has another name than the API's (each worker its own
    folder, filled from the model store) finds ``<api folder>/ControlNet/x`` in its own ``ControlNet/``."""
    path = Path(models_dir).parent / location
    parts = Path(location).parts
    if not path.exists() and len(parts) > 2 and parts[1] == CONTROLNET_DIR:
        return Path(models_dir).joinpath(*parts[1:])
    return path


def controlnet_relpath(location: str) -> str | None:
    """The path inside a models folder (``ControlNet/x.safetensors``) of a location in ``<folder>/ControlNet/``;
    None for the extension's own folder (not part of the model store)."""
    parts = Path(location).parts
    return Path(*parts[1:]).as_posix() if len(parts) > 2 and parts[1] == CONTROLNET_DIR else None


def resolve_controlnet(models_dir: Path, requested: str, field: tuple[str | int, ...],
                       entries: list[ControlNetFile] | None = None) -> ControlNetFile:
    """The ControlNet ``requested`` names: its title (``name [hash]``), its name, or its file name; a title whose
    hash no longer matches still finds the file by name, as the extension falls back to the name. Raises
    FieldError naming ``field`` for an unknown or refused model (listing the loadable ones)."""
    from shared.models.store_registry import refresh_for

    entries = list_controlnets(models_dir) if entries is None else entries
    wanted = requested.strip()
    bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted

    def matching(entries: list[ControlNetFile]) -> list[ControlNetFile]:
        found = [e for e in entries if wanted in (e.title, e.name, e.path.name, e.location)]
        return found or [e for e in entries if bare.lower() in (e.name.lower(), e.title.lower())]

    matches = matching(entries)
    if not matches and refresh_for(models_dir):  # added to the model store within the view's last second?
        entries = list_controlnets(models_dir)
        matches = matching(entries)
    if matches:
        chosen = matches[0]
        if chosen.refused_reason is not None:
            raise FieldError(field, f"ControlNet model {requested!r} is refused: {chosen.refused_reason}")
        return chosen
    available = ", ".join(e.title for e in entries if e.loadable) or "none installed"
    raise FieldError(field, f"unknown ControlNet model {requested!r}; available: {available}")
