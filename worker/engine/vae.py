"""Per-job VAE choice (``models/VAE/*.safetensors``) and the WebUI's encode/decode conventions.

Why a library of VAE variants instead of swapping ``pipe.vae``: the engine never reads the VAE from
the pipeline during a job, it is handed the module to use. A job that names a VAE gets a cached copy
built from the checkpoint's own VAE config with the file's weights; the checkpoint's VAE is never
modified, so the next job cannot inherit a VAE it did not ask for.

Files come in the WebUI's layout (``encoder.down.0.block.0.conv1.weight``, optionally under
``first_stage_model.``) or diffusers' (``encoder.down_blocks.0.resnets.0.conv1.weight``); the first is
converted with diffusers' own single-file converter. Only ``.safetensors`` files are opened.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shared.errors import FieldError

VAE_FIELD = ("body", "vae")
OWN_VAE_NAMES = ("", "none", "automatic")
_DIFFUSERS_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"


@dataclass(frozen=True)
class VaeChoice:
    """The VAE a job renders with; ``name``/``short_hash`` are None for the checkpoint's own."""

    module: Any
    name: str | None = None
    short_hash: str | None = None


# What torch raises when a CUDA allocation fails (``torch.cuda.OutOfMemoryError`` on older releases).
OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    if isinstance(cls, type)
)


def resolve_vae_file(folder: Path, requested: str) -> Path:
    """Find ``requested`` (file name, with or without extension) inside the VAE folder, or raise FieldError."""
    name = requested.strip()
    if "\\" in name or "\x00" in name or name.startswith("/") or ".." in Path(name).parts:
        raise FieldError(VAE_FIELD, f"vae {requested!r} is not a name inside the VAE folder")
    candidates = [folder / name, folder / f"{name}.safetensors"]
    for path in candidates:
        if path.is_file() and path.suffix.lower() == ".safetensors":
            return path
    if any(path.is_file() for path in candidates) or Path(name).suffix.lower() in (".pt", ".ckpt", ".bin"):
        raise FieldError(VAE_FIELD, f"vae {requested!r}: only .safetensors VAE files are loaded (pickles can run code)")
    available = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    raise FieldError(VAE_FIELD, f"unknown vae {requested!r}; available: {', '.join(available) or 'none'}")


def vae_state_dict_for(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The file's weights in diffusers' key layout."""
    tensors = load_file(str(path), device="cpu")
    if _DIFFUSERS_PROBE in tensors or f"vae.{_DIFFUSERS_PROBE}" in tensors:
        prefix = "vae." if f"vae.{_DIFFUSERS_PROBE}" in tensors else ""
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(tensors, config)


class VaeLibrary:
    """VAE variants built from files, least recently used dropped beyond ``capacity``."""

    def __init__(self, folder: Path, capacity: int = 2) -> None:
        self.folder = Path(folder)
        self.capacity = capacity
        self._variants: OrderedDict[tuple, VaeChoice] = OrderedDict()
        self.loads = 0

    def choose(self, requested: str | None, own_vae: Any) -> VaeChoice:
        """The VAE for a job: the checkpoint's own for None/""/"None"/"Automatic", else the named file."""
        if requested is None or str(requested).strip().lower() in OWN_VAE_NAMES:
            return VaeChoice(own_vae)
        path = resolve_vae_file(self.folder, str(requested))
        stat = path.stat()
        config = dict(own_vae.config)
        key = (str(path), stat.st_mtime_ns, stat.st_size, repr(sorted(config.items())),
               str(own_vae.device), str(own_vae.dtype))
        if key in self._variants:
            self._variants.move_to_end(key)
            return self._variants[key]
        module = copy.deepcopy(own_vae)
        try:
            state = vae_state_dict_for(path, config)
            missing, unexpected = module.load_state_dict(state, strict=False)
        except Exception as exc:
            raise FieldError(VAE_FIELD, f"vae {path.name!r} could not be read: {exc}") from exc
        if missing:
            raise FieldError(VAE_FIELD, f"vae {path.name!r} does not fit this checkpoint's VAE: "
                                        f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
        module.eval()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        choice = VaeChoice(module, path.name, digest)
        self._variants[key] = choice
        self.loads += 1
        while len(self._variants) > self.capacity:
            self._variants.popitem(last=False)
        return choice


@torch.no_grad()
def decode_images(vae: Any, latents: torch.Tensor, per_call: int) -> list[Any]:
    """Latents ``(n, C, h, w)`` to PIL images the way the WebUI does (clamp, x255, truncate), ``per_call``
    latents per VAE call (the batch's memory budget); a call that runs out of GPU memory is split."""
    from PIL import Image

    images = []
    per_call = max(1, per_call)
    for start in range(0, latents.shape[0], per_call):
        chunk = latents[start : start + per_call]
        try:
            x = vae.decode(chunk.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample.float()
        except OUT_OF_MEMORY:
            if chunk.shape[0] == 1:
                raise
            images += decode_images(vae, chunk, chunk.shape[0] // 2)
            continue
        x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
        for sample in x:
            images.append(Image.fromarray((255.0 * sample.cpu().permute(1, 2, 0).numpy()).astype("uint8")))
    return images


@torch.no_grad()
def encode_image(vae: Any, image: Any, seed: int) -> torch.Tensor:
    """One RGB PIL image to a latent ``(1, C, h, w)`` float32 on the CPU.

    The posterior is sampled like the WebUI's ``DiagonalGaussianDistribution.sample`` (mean + std *
    CPU randn), with the noise from a CPU generator seeded with the image's seed so the same job
    always encodes the same way.
    """
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(np.moveaxis(array, 2, 0).copy())[None] * 2.0 - 1.0
    posterior = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist
    mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    noise = torch.randn(mean.shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
    return (mean + std * noise) * vae.config.scaling_factor
