"""A ControlNet unit as a client sends it (:class:`UnitRequest`) and as the contract stores it (:class:`ControlUnit`).

The request shape is the extension's ``ControlNetUnit`` (``internal_controlnet/args.py``, API version 3) with its
field names, defaults and legacy aliases (``input_image`` -> ``image``, ``lowvram`` -> ``low_vram``, ``guidance`` ->
``guidance_end``, ``mask_image`` -> ``mask``; both spellings at once is an error). Enumerations take the
extension's strings, the old names ("Inner Fit (Scale to Fit)", "Envelope (Outer Fit)", ...) and, as its API did
before version 3 and many clients still send, the integers 0/1/2.

Two deliberate differences, both so that nothing a user sent is lost silently: a value outside a slider's range
is a 422 naming the field (the extension quietly puts the preprocessor's default in; -1 still means "default"),
and on ``POST /v1/jobs`` a listed unit is enabled unless it says ``enabled: false`` (on the WebUI API the
extension's default, off, holds, with a warning in ``info``).

The stored unit holds only resolved values: the preprocessor's canonical name, the model's file (by location)
and title, numbers with defaults applied, and object-store keys of its images (``image`` None: the job's init
image, as the extension uses it on img2img).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.controlnet.detectmap import ResizeMode, parse_resize_mode

__all__ = [
    "ControlMode",
    "ControlUnit",
    "HiresOption",
    "ResizeMode",
    "UnitRequest",
    "parse_control_mode",
    "parse_hr_option",
]


class ControlMode(StrEnum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


class HiresOption(StrEnum):
    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"


def _parse_enum(value: object, enum: type[StrEnum], what: str) -> Any:
    members = list(enum)
    if isinstance(value, enum):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(members):
        return members[value]
    if isinstance(value, str):
        for member in members:
            if value.strip().lower() == member.value.lower():
                return member
    allowed = ", ".join(f"{i} or {m.value!r}" for i, m in enumerate(members))
    raise ValueError(f"{what} must be one of {allowed}; got {value!r}")


def parse_control_mode(value: object) -> ControlMode:
    """The extension's strings, or 0/1/2 as its API before version 3 took them."""
    return _parse_enum(value, ControlMode, "control_mode")


def parse_hr_option(value: object) -> HiresOption:
    return _parse_enum(value, HiresOption, "hr_option")


_LEGACY_ALIASES = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end", "mask_image": "mask"}


class UnitRequest(BaseModel):
    """One unit as a client sends it (``controlnet`` on ``POST /v1/jobs``; the extension's ``args`` on the WebUI API).

    ``image`` is base64 (a data URL is fine) or ``upload:<id>``; ``{"image": ..., "mask": ...}`` and
    ``[image, mask]`` are accepted too, as the extension accepts them.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    module: str = Field("none", max_length=200, description="preprocessor (GET /v1/controlnet/modules)")
    model: str = Field("None", max_length=500, description="ControlNet model title or name (GET /v1/controlnet/models)")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: str | None = Field(None, description="control image: base64, data URL or upload:<id>; none on img2img: "
                                                "the init image")
    mask: str | None = Field(None, description="mask for inpainting preprocessors: base64 or upload:<id>")
    resize_mode: ResizeMode = Field(ResizeMode.CROP_AND_RESIZE, description="Just Resize, Crop and Resize, "
                                                                            "Resize and Fill (or 0, 1, 2)")
    low_vram: bool = False
    processor_res: int = Field(-1, ge=-1, le=4096, description="-1: the preprocessor's default")
    threshold_a: float = Field(-1, ge=-1, le=4096, description="-1: the preprocessor's default")
    threshold_b: float = Field(-1, ge=-1, le=4096, description="-1: the preprocessor's default")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED
    hr_option: HiresOption = HiresOption.BOTH

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in ("image", "input_image", "mask", "mask_image"):
            if data.get(name) == "":  # webuiapi sends "" for "no image"
                data[name] = None
        for old, new in _LEGACY_ALIASES.items():
            if old in data:
                if new in data and data[new] is not None and data[old] is not None:
                    raise ValueError(f"both {old!r} and {new!r} given; {old!r} is the old name of {new!r}: send one")
                value = data.pop(old)
                data.setdefault(new, value)
                if data[new] is None:
                    data[new] = value
        image = data.get("image")
        if isinstance(image, dict):
            extra = set(image) - {"image", "mask"}
            if extra:
                raise ValueError(f"image: an image object has 'image' and 'mask' only; got {sorted(extra)}")
            data["image"] = image.get("image")
            if image.get("mask") is not None:
                if data.get("mask") is not None:
                    raise ValueError("mask given both inside image and as mask: send one")
                data["mask"] = image["mask"]
        elif isinstance(image, list | tuple):
            if len(image) != 2 or any(isinstance(item, dict | list) for item in image):
                raise ValueError("image: a list must be [image, mask]; several input images per unit are not supported")
            data["image"], data["mask"] = image[0], image[1] if image[1] is not None else data.get("mask")
        return data

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, value: object) -> ResizeMode:
        return parse_resize_mode(value)  # type: ignore[arg-type]

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, value: object) -> ControlMode:
        return parse_control_mode(value)

    @field_validator("hr_option", mode="before")
    @classmethod
    def _hr_option(cls, value: object) -> HiresOption:
        return parse_hr_option(value)

    @model_validator(mode="after")
    def _window(self) -> UnitRequest:
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must not be after guidance_end "
                             f"({self.guidance_end})")
        return self


class ControlUnit(BaseModel):
    """A unit in the render contract: everything resolved, images by object-store key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    module: str = Field(description="canonical preprocessor name")
    model: str = Field(description="the model's name (file stem), as infotexts show it without hash")
    model_title: str = Field(description="'name [hash]' as the extension lists it")
    model_location: str = Field(description="path relative to the models root's parent: models/ControlNet/...")
    weight: float = 1.0
    image: str | None = Field(None, description="object-store key of the control image; None: the init image")
    mask: str | None = None
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    processor_res: int | float = 512  # a hidden resolution slider's default is 0.5, written "0.5" as the extension
    # int or float as resolved (a preprocessor's default 100 is written "100" in the infotext, a sent 100.0 "100.0")
    threshold_a: int | float = 0.5
    threshold_b: int | float = 0.5
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED
    hr_option: HiresOption = HiresOption.BOTH
    low_vram: bool = False

    @field_validator("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end")
    @classmethod
    def _finite(cls, value: int | float) -> int | float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
