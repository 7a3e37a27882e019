"""Upscale jobs: the WebUI's Extras tab (``modules/postprocessing.py`` with ``scripts/postprocessing_upscale.py``).

For each input image, as ``ScriptPostprocessingUpscale.process`` does: nothing when ``upscaler_1`` is None;
otherwise the scale (``upscaling_resize``, or for resize_mode 1 the factor that covers
``upscaling_resize_w`` x ``upscaling_resize_h``), ``Upscaler.upscale`` with upscaler 1 (model passes, then a
LANCZOS resize to the target floored to a multiple of 8), for resize_mode 1 with crop a paste centred on a
black canvas of exactly the asked size; with upscaler 2 and a visibility above 0 the same on the original
image, blended over the first (``Image.blend``). Then, with ``gfpgan_visibility`` above 0, GFPGAN
(``scripts/postprocessing_gfpgan.py``): the restored faces blended over the image by the visibility. The ``info``
keys are the WebUI's, in its order; the runner writes them as the image's ``postprocessing`` text beside the
source's own ``parameters``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from shared.jobs.contract import UpscaleSpec
from shared.webui.infotext import quote
from worker.engine.upscalers import LoadedUpscaler, upscale_by

__all__ = ["ExtrasImage", "builtin_upscale", "extras_infotext", "run_extras", "upscale_with"]

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST
UpscalerLoader = Callable[[str], LoadedUpscaler]  # a model's file (relative to the models folder) -> the model
ImageReader = Callable[[str], Image.Image]
FaceRestorerLoader = Callable[[], Any]  # -> worker.engine.face_restoration.FaceRestorer


@dataclass
class ExtrasImage:
    index: int
    image: Image.Image
    info: dict[str, object] = field(default_factory=dict)
    source_infotext: str | None = None


def builtin_upscale(image: Image.Image, name: str, scale: float) -> Image.Image:
    """``Upscaler.upscale`` with the built-in None, Lanczos or Nearest (one resize by ``int(w * scale)``), then
    the LANCZOS resize to the target floored to a multiple of 8."""
    dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
    if name in ("Lanczos", "Nearest") and not (image.width >= dest[0] and image.height >= dest[1] and scale != 1):
        size = (int(image.width * scale), int(image.height * scale))
        image = image.resize(size, resample=NEAREST if name == "Nearest" else LANCZOS)
    if image.size != dest:
        image = image.resize(dest, resample=LANCZOS)
    return image


def upscale_with(image: Image.Image, name: str, file: str | None, scale: float, spec: UpscaleSpec,
                 load_upscaler: UpscalerLoader) -> Image.Image:
    """One upscaler's ``upscale(image, scale)``: a model's file through the loader, else a built-in."""
    if file is None:
        return builtin_upscale(image, name, scale)
    return upscale_by(load_upscaler(file), image, scale, spec.upscaler_tile, spec.upscaler_tile_overlap)


def _upscale(image: Image.Image, name: str, file: str | None, spec: UpscaleSpec, load_upscaler: UpscalerLoader,
             info: dict[str, object]) -> Image.Image:
    """``ScriptPostprocessingUpscale.upscale``: the scale, the upscale, the crop, and their info keys."""
    if spec.resize_mode == 1:
        scale = max(spec.upscaling_resize_w / image.width, spec.upscaling_resize_h / image.height)
        info["Postprocess upscale to"] = f"{spec.upscaling_resize_w}x{spec.upscaling_resize_h}"
    else:
        scale = spec.upscaling_resize
        info["Postprocess upscale by"] = _number(spec.upscaling_resize)
    result = upscale_with(image, name, file, scale, spec, load_upscaler)
    if spec.resize_mode == 1 and spec.upscaling_crop:
        width, height = spec.upscaling_resize_w, spec.upscaling_resize_h
        canvas = Image.new("RGB", (width, height))
        canvas.paste(result, box=(width // 2 - result.width // 2, height // 2 - result.height // 2))
        result = canvas
        info["Postprocess crop to"] = f"{width}x{height}"
    return result


def _number(value: float) -> float | int:
    """A whole factor as the WebUI's slider sends it (``4``), a fraction as given (``2.5``)."""
    return int(value) if float(value).is_integer() else value


def postprocess(image: Image.Image, spec: UpscaleSpec, load_upscaler: UpscalerLoader,
                load_face_restorer: FaceRestorerLoader | None = None) -> tuple[Image.Image, dict[str, object]]:
    """One input through the Extras steps in the WebUI's order (upscale 1000, GFPGAN 2000): the result and its info
    keys (none for a step that did nothing)."""
    info: dict[str, object] = {}
    image = _upscale_step(image, spec, load_upscaler, info)
    if spec.gfpgan_visibility > 0:
        image = _gfpgan_step(image, spec.gfpgan_visibility, load_face_restorer, info)
    return image, info


def _gfpgan_step(image: Image.Image, visibility: float, load_face_restorer: FaceRestorerLoader | None,
                 info: dict[str, object]) -> Image.Image:
    """``ScriptPostprocessingGfpGan``: restore the faces, blend by the visibility, record it."""
    from worker.engine.face_restoration import restore_faces

    if load_face_restorer is None:
        raise ValueError("gfpgan_visibility > 0 needs a face restorer")
    restored = restore_faces(load_face_restorer(), image.convert("RGB"))
    if visibility < 1.0:
        restored = Image.blend(image.convert("RGB"), restored, visibility)
    info["GFPGAN visibility"] = round(visibility, 3)
    return restored


def _upscale_step(image: Image.Image, spec: UpscaleSpec, load_upscaler: UpscalerLoader,
                  info: dict[str, object]) -> Image.Image:
    """``ScriptPostprocessingUpscale.process``: nothing when upscaler 1 is None."""
    if spec.upscaler_1 == "None":
        return image
    first = _upscale(image, spec.upscaler_1, spec.upscaler_1_file, spec, load_upscaler, info)
    info["Postprocess upscaler"] = spec.upscaler_1
    if spec.upscaler_2 != "None" and spec.extras_upscaler_2_visibility > 0:
        second = _upscale(image, spec.upscaler_2, spec.upscaler_2_file, spec, load_upscaler, info)
        if second.mode != first.mode:
            second = second.convert(first.mode)
        if second.size != first.size:  # defensive: both upscales target the same size
            second = second.resize(first.size, resample=LANCZOS)
        first = Image.blend(first, second, spec.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = spec.upscaler_2
    return first


def extras_infotext(info: dict[str, object]) -> str:
    """The WebUI's postprocessing text: ``key: value`` joined by ", ", values quoted as ``infotext_utils.quote``
    does (:func:`shared.webui.infotext.quote`)."""
    return ", ".join(key if key == value else f"{key}: {quote(str(value))}" for key, value in info.items()
                     if value is not None)


def run_extras(spec: UpscaleSpec, read_image: ImageReader, load_upscaler: UpscalerLoader,
               load_face_restorer: FaceRestorerLoader | None = None,
               on_image: Callable[[int, int], None] | None = None) -> list[ExtrasImage]:
    """Every input of an upscale job, in order. ``on_image(done, total)`` runs after each image (it may raise to
    cancel the job)."""
    results = []
    total = len(spec.images)
    for index, key in enumerate(spec.images):
        image, info = postprocess(read_image(key), spec, load_upscaler, load_face_restorer)
        source = spec.infotexts[index] if index < len(spec.infotexts) else None
        results.append(ExtrasImage(index, image, info, source))
        if on_image is not None:
            on_image(index + 1, total)
    return results
