"""img2img and inpainting inputs prepared as the WebUI prepares them (``StableDiffusionProcessingImg2Img.init``).

Why replicate the WebUI's image handling step by step: the same init image, mask and settings must
give the same picture. So the resize modes (``images.resize_image``), transparency flattening, mask
binarisation, inversion and blur, the "only masked" crop with padding (``masking.get_crop_region_v2``
and ``expand_crop_region``), "fill" (``masking.fill``), the latent mask and the final paste-back
(``apply_overlay``) all follow it. Pure PIL/numpy: no model is touched here.

Approximation: the WebUI blurs masks with OpenCV's fixed-point ``GaussianBlur``; this uses the same
kernel in float32 with the same reflect-101 border, so a pixel may differ by one level.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.storage.base import ObjectNotFoundError

LANCZOS = Image.Resampling.LANCZOS
BACKGROUND = "#ffffff"  # opts.img2img_background_color
FILL_NAMES = {0: "fill", 2: "latent noise", 3: "latent nothing"}  # 1 ("original") is not written


def resize_image(
    resize_mode: int, im: Image.Image, width: int, height: int, upscaler: str | None = None
) -> Image.Image:
    """0 just resize, 1 crop and resize, 2 resize and fill (any other mode resizes and fills too)."""

    def resize(image: Image.Image, w: int, h: int) -> Image.Image:
        if upscaler in (None, "None") or image.mode == "L":
            return image.resize((w, h), resample=LANCZOS)
        scale = max(w / image.width, h / image.height)
        if scale > 1.0:
            resample = Image.Resampling.NEAREST if upscaler == "Nearest" else LANCZOS
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if image.width != w or image.height != h:
            image = image.resize((w, h), resample=LANCZOS)
        return image

    if resize_mode == 0:
        return resize(im, width, height)
    ratio, src_ratio = width / height, im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = resize(im, src_w, src_h)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def flatten(img: Image.Image, bgcolor: str = BACKGROUND) -> Image.Image:
    """Transparency over the background colour, as RGB."""
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, bgcolor)
        background.paste(img, mask=img)
        img = background
    return img.convert("RGB")


def create_binary_mask(image: Image.Image) -> Image.Image:
    """An RGBA mask with real transparency uses its alpha, rounded; anything else its grey level."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    return image.convert("L")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma * sigma))
    return (kernel / kernel.sum()).astype(np.float32)


def blur_mask(mask: Image.Image, blur: int) -> Image.Image:
    """The WebUI's mask blur: a horizontal then a vertical Gaussian of sigma ``blur``."""
    array = np.asarray(mask, dtype=np.float32)
    kernel = _gaussian_kernel(float(blur))
    pad = len(kernel) // 2
    for axis in (1, 0):
        widths = [(0, 0), (0, 0)]
        widths[axis] = (pad, pad)
        padded = np.pad(array, widths, mode="reflect") if array.shape[axis] > pad else np.pad(array, widths, "edge")
        array = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def get_crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """Bounding box of the painted area plus padding; None for an empty mask (``get_crop_region_v2``)."""
    box = mask.getbbox()
    if not box:
        return None
    if not pad:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.size[0]), min(y2 + pad, mask.size[1])


def expand_crop_region(
    crop: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """Grow the crop to the processing aspect ratio, staying inside the image."""
    x1, y1, x2, y2 = crop
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 >= image_height:
            y1, y2 = y1 - (y2 - image_height), image_height
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, image_height)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 >= image_width:
            x1, x2 = x1 - (x2 - image_width), image_width
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """"Masked content: fill": the masked area painted with ever finer blurs of the rest."""
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


@dataclass
class Img2ImgInputs:
    """Everything the sampler needs from the init images and mask, per init image."""

    images: list[Image.Image]  # what the VAE encodes, per init image
    overlays: list[Image.Image] | None = None  # the kept pixels, pasted over each result
    latent_mask: Image.Image | None = None  # white = regenerate
    paste_to: tuple[int, int, int, int] | None = None  # "only masked": where the result goes back
    infotext: dict[str, object] = field(default_factory=dict)


def prepare_img2img(init_images: list[Image.Image], mask: Image.Image | None, spec: RenderSpec) -> Img2ImgInputs:
    width, height = spec.width, spec.height
    resize_mode, blur, inpainting_fill = spec.resize_mode, spec.mask_blur, spec.inpainting_fill
    full_res, padding = spec.inpaint_full_res, spec.inpaint_full_res_padding
    out = Img2ImgInputs(images=[])
    crop = None
    image_mask = mask_for_overlay = None
    if mask is not None:
        image_mask = create_binary_mask(mask)
        if spec.inpainting_mask_invert:
            image_mask = ImageOps.invert(image_mask)
            out.infotext["Mask mode"] = "Inpaint not masked"
        if blur > 0:
            image_mask = blur_mask(image_mask, blur)
            out.infotext["Mask blur"] = blur
        if full_res:
            mask_for_overlay = image_mask
            crop = get_crop_region(image_mask, padding)
            if crop is not None:
                crop = expand_crop_region(crop, width, height, image_mask.width, image_mask.height)
                image_mask = resize_image(2, image_mask.crop(crop), width, height)
                out.paste_to = (crop[0], crop[1], crop[2] - crop[0], crop[3] - crop[1])
                out.infotext["Inpaint area"] = "Only masked"
                out.infotext["Masked area padding"] = padding
            else:  # a blank mask: plain img2img, as the WebUI falls back
                image_mask = mask_for_overlay = None
        else:
            image_mask = resize_image(resize_mode, image_mask, width, height)
            doubled = np.clip(np.asarray(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
            mask_for_overlay = Image.fromarray(doubled)
        if image_mask is not None:
            out.overlays = []
    out.latent_mask = image_mask
    for img in init_images:
        image = flatten(img)
        if crop is None and resize_mode != 3:
            image = resize_image(resize_mode, image, width, height)
        if image_mask is not None and out.overlays is not None and mask_for_overlay is not None:
            if mask_for_overlay.size != image.size:
                mask_for_overlay = resize_image(resize_mode, mask_for_overlay, image.width, image.height)
            masked = Image.new("RGBa", (image.width, image.height))
            masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
            out.overlays.append(masked.convert("RGBA"))
        if crop is not None:
            image = resize_image(2, image.crop(crop), width, height)
        if image_mask is not None and inpainting_fill != 1:
            # Resize mode 3 keeps the init image's size until after encoding; the mask follows it.
            image = fill(image, image_mask if image_mask.size == image.size else image_mask.resize(image.size))
        out.images.append(image)
    if image_mask is not None and inpainting_fill in FILL_NAMES:
        out.infotext["Masked content"] = FILL_NAMES[inpainting_fill]
    return out


def latent_mask_tensors(latent_mask: Image.Image, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, regenerate)`` masks ``(C, h, w)`` at latent resolution, rounded to 0/1 like the WebUI."""
    channels, h, w = shape
    small = latent_mask.convert("RGB").resize((w, h), resample=Image.Resampling.BICUBIC)
    latmask = np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255)
    latmask = np.tile(latmask[None], (channels, 1, 1))
    return torch.from_numpy(1.0 - latmask), torch.from_numpy(latmask.copy())


def apply_overlay(image: Image.Image, paste_to: tuple[int, int, int, int] | None, overlay: Image.Image | None
                  ) -> Image.Image:
    """Put the generated area back into the untouched pixels of the init image."""
    if overlay is None:
        return image
    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", (overlay.width, overlay.height))
        base.paste(resize_image(1, image, w, h), (x, y))
        image = base
    elif overlay.size != image.size:  # resize mode 3: the overlay is at the init image's own size
        overlay = overlay.resize(image.size, resample=LANCZOS)
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


def read_stored_image(key: str, load_image: Callable[[str], bytes] | None, field: tuple[str | int, ...]) -> Image.Image:
    """An input image a job names by object-store key (init image, mask, control image); a missing or unreadable
    one is the job's input error, naming ``field``."""
    name = ".".join(str(part) for part in field[1:])
    if load_image is None:
        raise FieldError(field, f"{name}: this worker was given no image store to read it from")
    try:
        data = load_image(key)
    except ObjectNotFoundError as exc:
        raise FieldError(field, f"{name}: no uploaded image under {key!r}") from exc
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FieldError(field, f"{name}: {key!r} is not a readable image ({exc})") from exc
    return image
