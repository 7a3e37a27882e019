"""Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ... files) run the way the WebUI runs them.

Loading mirrors ``modules/modelloader.py:load_spandrel_model``: spandrel detects the architecture from the
state dict and builds the network in eval mode; half precision only when asked for, supported by the
architecture and on CUDA. Unlike the WebUI, which lets spandrel unpickle ``.pth`` files, a ``.pth``/``.pt``
file is read here with torch's restricted unpickler (``weights_only=True``): tensors and plain containers
only, so no pickled code ever runs. A file that cannot be used raises :class:`UpscalerRefused` with a reason.

Running mirrors the WebUI:

- one pass of the network (``upscale_pass``) is ``modules/upscaler_utils.py:upscale_with_model``: the PIL
  image is split with ``images.split_grid`` (tiles of ``tile_size`` overlapping by ``tile_overlap``, spread
  evenly, the last one flush with the edge; a tile larger than the image reaches past its top-left corner
  and is filled with black there), every tile goes through ``upscale_pil_patch`` and the results are put
  back with ``images.combine_grid`` (a linear 0..255 ramp over the overlap, as PIL masks). The folders whose
  WebUI upscalers call ``upscale_2`` instead (SwinIR, ScuNET) get its tiling: fixed-stride tiles in tensor
  space, overlapping outputs averaged (``tiled_upscale_2``).
- ``upscale_pil_patch`` feeds the network **BGR** (``pil_image_to_torch_bgr`` flips the channels), 0..1,
  float64 cast to the model's dtype, and converts back with clamp, x255, round half to even, BGR -> RGB.
  We do the same, so outputs match the WebUI's, not those of an RGB-fed model.
- ``upscale_by`` is ``modules/upscaler.py:Upscaler.upscale``: the target is floored to a multiple of 8
  (``dest = int(w * scale // 8 * 8)``), passes repeat (at most 3) until the image reaches it or stops
  growing, then one LANCZOS resize to the target.
- ``upscale_to`` is ``modules/images.py:resize_image`` mode 0 with a model upscaler (what hires fix calls):
  ``scale = max(w / im.width, h / im.height)``; the model runs only when ``scale > 1`` (and never on an
  ``L`` image), then a LANCZOS resize to exactly ``(w, h)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image

from worker.engine.weight_files import UnreadableWeights, first_line, read_weights

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

Tiling = Literal["grid", "weighted"]

LANCZOS = Image.Resampling.LANCZOS
# WebUI upscalers whose do_upscale calls upscaler_utils.upscale_2 (tiled_upscale_2) rather than
# upscale_with_model, keyed by their models/ folder: extensions-builtin/SwinIR and extensions-builtin/ScuNET.
WEIGHTED_TILING_FOLDERS = frozenset({"SwinIR", "ScuNET"})
MAX_PASSES = 3  # Upscaler.upscale: `for i in range(3)`


class UpscalerRefused(Exception):
    """A file that cannot be used as an upscaler; ``reason`` says why (and names the file)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LoadedUpscaler:
    """A loaded upscaler network, ready to run."""

    model: ImageModelDescriptor  # spandrel's descriptor: eval mode, on its device
    scale: int  # one pass multiplies width and height by this
    architecture: str  # spandrel's architecture id: "ESRGAN", "Compact", "SwinIR", "DAT", "HAT", ...
    size_bytes: int  # bytes of the network's parameters and buffers on its device (for the cache budget)
    tiling: Tiling = "grid"  # "grid": upscale_with_model's PIL grid; "weighted": tiled_upscale_2

    @property
    def module(self) -> torch.nn.Module:
        return self.model.model

    @property
    def dtype(self) -> torch.dtype:
        return _first_param(self.module).dtype

    @property
    def device(self) -> torch.device:
        return _first_param(self.module).device


def _first_param(module: torch.nn.Module) -> torch.Tensor:
    """``modules/torch_utils.py:get_param``: the device and dtype inputs are moved to."""
    for param in module.parameters():
        return param
    for buffer in module.buffers():
        return buffer
    raise ValueError("the upscaler network has no parameters")


# ---------------------------------------------------------------------------------------------- loading


def _read_state_dict(path: Path) -> dict[object, object]:
    """The file's top-level mapping, read without running pickled code; UpscalerRefused if it can't be."""
    try:
        return read_weights(path)
    except UnreadableWeights as exc:
        raise UpscalerRefused(exc.reason) from exc


def _tensors_only(raw: dict[str, object], name: str) -> dict[str, torch.Tensor]:
    import spandrel

    state = spandrel.canonicalize_state_dict(raw)  # unwraps params_ema / params / state_dict ..., "module."
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UpscalerRefused(f"{name}: holds no tensors (not a model's state dict)")
    return tensors


def load_upscaler(path: Path, device: torch.device | str = "cpu", *, prefer_half: bool = False,
                  tiling: Tiling | None = None) -> LoadedUpscaler:
    """Load an upscaler model file (``.pth``/``.pt`` via torch's weights-only unpickler, or ``.safetensors``).

    ``prefer_half``: convert to fp16 when spandrel says the architecture supports it and ``device`` is CUDA
    (the WebUI's ESRGAN upscaler loads in fp32; its Real-ESRGAN one prefers half unless --no-half).
    ``tiling``: how passes are tiled; by default the WebUI's for the file's folder (``upscale_2``'s weighted
    tiles for ``SwinIR/`` and ``ScuNET/``, ``upscale_with_model``'s grid otherwise).
    Raises UpscalerRefused (with ``.reason``) for a file that cannot be used; FileNotFoundError if it is gone.
    """
    import spandrel

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    state = _tensors_only(_read_state_dict(path), path.name)
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        sample = ", ".join(repr(k) for k in list(state)[:3])
        raise UpscalerRefused(
            f"{path.name}: unsupported architecture: spandrel {spandrel.__version__} recognises no model "
            f"in this file (keys such as {sample})") from exc
    except Exception as exc:  # detected, but the weights do not build that architecture
        raise UpscalerRefused(
            f"{path.name}: its weights do not form a model spandrel can build ({first_line(exc)})") from exc
    del state
    arch = descriptor.architecture
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerRefused(f"{path.name}: is a {arch.name} {descriptor.purpose.lower()} model, not an upscaler")
    if descriptor.purpose not in ("SR", "Restoration"):
        what = "face restoration" if descriptor.purpose == "FaceSR" else descriptor.purpose
        raise UpscalerRefused(f"{path.name}: is a {arch.name} {what} model, not an image upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscalerRefused(
            f"{path.name}: the {arch.name} model maps {descriptor.input_channels}-channel images to "
            f"{descriptor.output_channels}-channel ones; upscalers work on RGB (3 channels)")

    device = torch.device(device)
    descriptor.to(device)
    if prefer_half and descriptor.supports_half and device.type == "cuda":
        descriptor.half()
    descriptor.eval()
    descriptor.model.requires_grad_(False)
    size = sum(t.numel() * t.element_size() for t in [*descriptor.model.parameters(), *descriptor.model.buffers()])
    if tiling is None:
        tiling = "weighted" if set(path.parent.parts) & set(WEIGHTED_TILING_FOLDERS) else "grid"  # subfolders too
    return LoadedUpscaler(model=descriptor, scale=int(descriptor.scale), architecture=arch.id,
                          size_bytes=int(size), tiling=tiling)


# ----------------------------------------------------------------------------------- one network pass


def _pil_to_bgr(image: Image.Image) -> torch.Tensor:
    """``pil_image_to_torch_bgr``: RGB -> BGR, HWC -> CHW, /255 in float64 (cast to the model dtype later)."""
    arr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)) / 255)


def _bgr_to_pil(tensor: torch.Tensor) -> Image.Image:
    """``torch_bgr_to_pil_image``: clamp 0..1, x255 in float32, round half to even, BGR -> RGB."""
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"{tuple(tensor.shape)} is not one BCHW image")
        tensor = tensor[0]
    arr = tensor.float().cpu().clamp_(0, 1).numpy()
    arr = (np.float32(255.0) * np.moveaxis(arr, 0, 2)).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, ::-1]), "RGB")


def _run(up: LoadedUpscaler, batch: torch.Tensor) -> torch.Tensor:
    return up.model(batch)  # spandrel pads to its size requirements, clamps to 0..1 and crops the padding


def _upscale_patch(up: LoadedUpscaler, image: Image.Image) -> Image.Image:
    """``upscale_pil_patch``: one network call on a whole (small) PIL image."""
    param = _first_param(up.module)
    with torch.inference_mode():
        tensor = _pil_to_bgr(image).unsqueeze(0).to(device=param.device, dtype=param.dtype)
        return _bgr_to_pil(_run(up, tensor))


@dataclass
class _Tile:
    x: int
    y: int
    image: Image.Image


def _grid_origins(length: int, tile: int, overlap: int) -> list[int]:
    """``images.split_grid`` along one axis: evenly spread starts, the last flush with the far edge (negative
    when the tile is longer than the image). At least one tile: for a side no longer than the overlap the
    WebUI's count is 0 and upscale_with_model fails (``scale_factor`` unbound); one overhanging tile covers it."""
    count = max(1, math.ceil((length - overlap) / (tile - overlap)))
    step = (length - tile) / (count - 1) if count > 1 else 0
    origins = []
    for i in range(count):
        origin = int(i * step)
        if origin + tile >= length:
            origin = length - tile
        origins.append(origin)
    return origins


def _ramp_mask(overlap: int, size: tuple[int, int], horizontal: bool) -> Image.Image:
    """``combine_grid``'s masks: 0, 255/overlap, ... (truncated to uint8) across the overlap."""
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    width, height = size
    arr = np.tile(ramp, (height, 1)) if horizontal else np.tile(ramp[:, None], (1, width))
    return Image.fromarray(np.ascontiguousarray(arr), "L")


def _combine(rows: list[tuple[int, list[_Tile]]], tile_w: int, tile_h: int, width: int, height: int,
             overlap: int) -> Image.Image:
    """``images.combine_grid``: each row's tiles blended left to right, then the rows top to bottom."""
    mask_w = _ramp_mask(overlap, (overlap, tile_h), horizontal=True) if overlap else None
    mask_h = _ramp_mask(overlap, (width, overlap), horizontal=False) if overlap else None
    combined = Image.new("RGB", (width, height))
    for y, tiles in rows:
        row = Image.new("RGB", (width, tile_h))
        for t in tiles:
            if t.x == 0:
                row.paste(t.image, (0, 0))
                continue
            if overlap:
                row.paste(t.image.crop((0, 0, overlap, tile_h)), (t.x, 0), mask=mask_w)
            row.paste(t.image.crop((overlap, 0, tile_w, tile_h)), (t.x + overlap, 0))
        if y == 0:
            combined.paste(row, (0, 0))
            continue
        if overlap:
            combined.paste(row.crop((0, 0, width, overlap)), (0, y), mask=mask_h)
        combined.paste(row.crop((0, overlap, width, tile_h)), (0, y + overlap))
    return combined


def _grid_pass(up: LoadedUpscaler, image: Image.Image, tile: int, overlap: int,
               on_tile: Callable[[int, int], None] | None) -> Image.Image:
    """``upscale_with_model`` with tiles: split_grid, upscale_pil_patch per tile, combine_grid."""
    ys = _grid_origins(image.height, tile, overlap)
    xs = _grid_origins(image.width, tile, overlap)
    total, done, factor = len(xs) * len(ys), 0, up.scale
    rows: list[tuple[int, list[_Tile]]] = []
    for y in ys:
        tiles = []
        for x in xs:
            crop = image.crop((x, y, x + tile, y + tile))  # past the image's edge: filled with zeros (black)
            out = _upscale_patch(up, crop)
            factor = out.width // crop.width
            tiles.append(_Tile(x * factor, y * factor, out))
            done += 1
            if on_tile is not None:
                on_tile(done, total)
        rows.append((y * factor, tiles))
    return _combine(rows, tile * factor, tile * factor, image.width * factor, image.height * factor,
                    overlap * factor)


def _weighted_pass(up: LoadedUpscaler, image: Image.Image, tile: int, overlap: int,
                   on_tile: Callable[[int, int], None] | None) -> Image.Image:
    """``upscale_2`` / ``tiled_upscale_2``: fixed-stride tiles (the last flush with the edge), their outputs
    summed into place and divided by how many tiles covered each pixel."""
    param = _first_param(up.module)
    scale = up.scale
    with torch.inference_mode():
        img = _pil_to_bgr(image).to(dtype=param.dtype).unsqueeze(0).to(param.device)
        _, channels, h, w = img.shape
        tile = min(tile, h, w)
        if tile - overlap <= 0:  # untiled; or the image's short side is within the overlap, where the
            out = _run(up, img)  # WebUI's index lists leave pixels uncovered (0/0) or its range() fails
            if on_tile is not None:
                on_tile(1, 1)
        else:
            stride = tile - overlap
            hs = [*range(0, h - tile, stride), h - tile]
            ws = [*range(0, w - tile, stride), w - tile]
            result = torch.zeros(1, channels, h * scale, w * scale, device=param.device, dtype=img.dtype)
            weights = torch.zeros_like(result)
            total, done = len(hs) * len(ws), 0
            for hi in hs:
                for wi in ws:
                    patch = _run(up, img[..., hi:hi + tile, wi:wi + tile])
                    region = (..., slice(hi * scale, (hi + tile) * scale), slice(wi * scale, (wi + tile) * scale))
                    result[region].add_(patch)
                    weights[region].add_(torch.ones_like(patch))
                    done += 1
                    if on_tile is not None:
                        on_tile(done, total)
            out = result.div_(weights)
        return _bgr_to_pil(out)


def upscale_pass(up: LoadedUpscaler, image: Image.Image, tile_size: int, tile_overlap: int, *,
                 on_tile: Callable[[int, int], None] | None = None) -> Image.Image:
    """One pass of the network: an RGB image ``up.scale`` times the size of ``image``.

    ``tile_size`` 0 (or less) runs the whole image at once; otherwise tiles of ``tile_size`` px overlapping by
    ``tile_overlap`` (the WebUI's ``ESRGAN_tile``/``ESRGAN_tile_overlap``, defaults 192 and 8), tiled and blended
    as ``up.tiling`` says. ``on_tile(done, total)`` is called after each tile (memory only: it runs between
    network calls).
    """
    if tile_size > 0 and not 0 <= tile_overlap < tile_size:
        raise ValueError(f"tile_overlap must be at least 0 and smaller than tile_size ({tile_size}), "
                         f"not {tile_overlap}")
    if up.tiling == "weighted":
        return _weighted_pass(up, image, tile_size, tile_overlap, on_tile)
    if tile_size <= 0:
        out = _upscale_patch(up, image)
        if on_tile is not None:
            on_tile(1, 1)
        return out
    return _grid_pass(up, image, tile_size, tile_overlap, on_tile)


# ------------------------------------------------------------------------------------------ resizing


def upscale_by(up: LoadedUpscaler, image: Image.Image, scale: float, tile_size: int, tile_overlap: int, *,
               on_tile: Callable[[int, int], None] | None = None) -> Image.Image:
    """``Upscaler.upscale(img, scale)``: passes until the target is reached (at most 3, stopping when a pass
    no longer changes the size), then a LANCZOS resize to the target, which the WebUI floors to a multiple
    of 8: ``(int(w * scale // 8 * 8), int(h * scale // 8 * 8))``. With ``scale == 1`` one pass still runs."""
    dest_w = int((image.width * scale) // 8 * 8)
    dest_h = int((image.height * scale) // 8 * 8)
    for i in range(MAX_PASSES):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        before = image.size
        image = upscale_pass(up, image, tile_size, tile_overlap, on_tile=on_tile)
        if image.size == before:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def upscale_to(up: LoadedUpscaler, image: Image.Image, width: int, height: int, tile_size: int,
               tile_overlap: int, *, on_tile: Callable[[int, int], None] | None = None) -> Image.Image:
    """``images.resize_image(0, im, width, height, upscaler_name)`` with this model as the upscaler (the image
    upscale of hires fix): the model only when enlarging (``scale = max(width / w, height / h) > 1``) and never
    for an ``L`` image, then LANCZOS to exactly ``(width, height)``."""
    if image.mode == "L":
        return image.resize((width, height), resample=LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale_by(up, image, scale, tile_size, tile_overlap, on_tile=on_tile)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image
