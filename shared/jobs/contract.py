"""The render contract: everything a worker needs to render a job, typed, frozen and versioned.

The API's resolution step (:func:`api.submission.params.plan_job`) builds a :class:`RenderSpec`;
the job row stores ``spec.to_stored()`` in ``jobs.params``; the worker parses it once after the claim
(:meth:`RenderSpec.from_stored`) and the engine reads attributes. Every default and every cast is
decided here, once, not at each read.

Field names are the WebUI's parameter names, exactly the keys rows have always stored, so a row
written before this module existed (a queued job of a running farm) still parses: keys added over
time (``loras``, ``denoising_strength``, ...) get the default the worker used to apply for a missing
key. The stored shape stays flat, as the WebUI names it; read-only views (job JSON, the admin
dashboard, the WebUI API's ``info``) keep reading that dict.

Unknown keys are refused (``extra="forbid"``): a key this worker does not know means the row was
written by a newer API, and rendering without it would silently make a different image than the one
asked for and write an infotext that lies. The job fails with a message saying so instead. A change
of meaning of an existing field bumps ``version``; a worker refuses versions it does not know.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.controlnet.units import ControlUnit
from shared.jobs.training_spec import TRAIN_MODE, TrainSpec
from shared.prompt_dictionary.choices import PromptBuilderRequest
from shared.webui.prompts import extract_lora_tags

__all__ = ["CONTRACT_VERSION", "BatchKey", "HypernetSpec", "JobSpec", "LoraSpec", "RenderSpec", "TrainSpec",
           "UpscaleSpec", "parse_job_spec"]

CONTRACT_VERSION = 1
# The WebUI's defaults: img2img's denoising slider, and txt2img's hires fix slider.
IMG2IMG_DENOISING = 0.75
HIRES_DENOISING = 0.7

BatchKey = tuple[Any, ...]


class HypernetSpec(BaseModel):
    """One hypernetwork of the job (a ``<hypernet:name:multiplier>`` tag): its file in ``models/hypernetworks``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    multiplier: float = 1.0
    file: str


class LoraSpec(BaseModel):
    """One LoRA of the job: display name, multiplier, file in ``models/Lora`` and its 12-hex hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float = 1.0
    file: str
    hash: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _file_from_name(cls, data: Any) -> Any:
        """A LoRA named by a prompt tag in an old row is the file ``<name>.safetensors``."""
        if isinstance(data, dict) and not data.get("file") and "name" in data:
            return {**data, "file": f"{data['name']}.safetensors"}
        return data


class RenderSpec(BaseModel):
    """What the engine renders: resolved names, explicit seeds, every WebUI option the engine honours.

    Seeds are never -1 here (the API picked them), names are file names the API resolved, and
    ``prompt`` already carries the styles (it is what is encoded and what the infotext shows).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1  # CONTRACT_VERSION
    mode: Literal["txt2img", "img2img"] = "txt2img"
    model: str = Field(description="checkpoint name in models/Stable-diffusion")
    prompt: str
    negative_prompt: str = ""
    styles: tuple[str, ...] = Field((), description="applied already; kept for the record")
    steps: int
    cfg_scale: float
    sampler_name: str = Field(description="canonical WebUI sampler name")
    scheduler: str = Field(description="canonical schedule type ('Automatic': the sampler's own)")
    seed: int
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = Field(-1, description="<= 0: off")
    seed_resize_from_h: int = Field(-1, description="<= 0: off")
    width: int
    height: int
    batch_size: int = 1
    n_iter: int = 1
    vae: str | None = Field(None, description="file in models/VAE; None: the checkpoint's own")
    vae_hash: str | None = None
    clip_skip: int = 1
    eta_noise_seed_delta: int = 0
    denoising_strength: float = Field(description="img2img strength, or the hires pass's; default by mode")
    # img2img and inpainting: object-store keys of the uploaded inputs
    init_images: tuple[str, ...] = ()
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: Literal[0, 1, 2, 3] = Field(1, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: Literal[0, 1] = 0
    resize_mode: Literal[0, 1, 2, 3] = Field(0, description="0 just resize, 1 crop, 2 fill, 3 latent upscale")
    # hires fix (txt2img only)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str = Field("Latent", description="the WebUI's name (what the infotext shows)")
    hr_upscaler_file: str | None = Field(None, description="a model upscaler's file, relative to the models folder")
    upscaler_tile: int = Field(192, description="ESRGAN_tile: tile side of a model upscaler's pass, 0: untiled")
    upscaler_tile_overlap: int = Field(8, description="ESRGAN_tile_overlap")
    hr_second_pass_steps: int = Field(0, description="0: as many as the first pass")
    hr_prompt: str = Field("", description="empty: the prompt")
    hr_negative_prompt: str = Field("", description="empty: the negative prompt")
    hr_sampler_name: str | None = Field(None, description="None: the first pass's sampler")
    hr_scheduler: str | None = Field(None, description="None: the first pass's schedule type")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    restore_faces: bool = Field(False, description="GFPGAN on each decoded image, before the inpainting overlay")
    loras: tuple[LoraSpec, ...] = Field((), description="every LoRA the job applies (prompt tags and the field)")
    controlnet: tuple[ControlUnit, ...] = Field((), description="enabled ControlNet units, in order")
    hypernetworks: tuple[HypernetSpec, ...] = Field((), description="the prompt's <hypernet:> tags, applied in order "
                                                                    "to every attention layer's keys and values")
    batch_invariant: bool = Field(False, description="images denoised one at a time, never with other jobs': "
                                                     "image k is pixel-identical to a single job with seed + k")
    prompt_builder: PromptBuilderRequest | None = Field(None, description="the prompt dictionary's resolved choices "
                                                                          "and seed, for the record: the prompt holds "
                                                                          "their text already")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_older_rows(cls, data: Any) -> Any:
        """Refuse unknown versions clearly; give keys older rows lack the value the worker always gave them."""
        if not isinstance(data, dict):
            return data
        version = data.get("version", CONTRACT_VERSION)
        if version != CONTRACT_VERSION:
            raise ValueError(f"render contract version {version!r} is not supported by this worker "
                             f"(it reads version {CONTRACT_VERSION}); upgrade the worker")
        # A None where the field has a default of its own (an old row's "unset") takes that default.
        filled = {key: value for key, value in data.items()
                  if value is not None or key not in cls.model_fields
                  or cls.model_fields[key].is_required() or cls.model_fields[key].default is None}
        if filled.get("denoising_strength") is None:
            img2img = filled.get("mode") == "img2img"
            filled["denoising_strength"] = IMG2IMG_DENOISING if img2img else HIRES_DENOISING
        if "loras" not in filled:
            filled["loras"] = _prompt_tag_loras(str(filled.get("prompt") or ""))
        return filled

    @classmethod
    def from_stored(cls, params: dict[str, Any]) -> RenderSpec:
        """The spec of a ``jobs.params`` row (any row this farm ever wrote); raises pydantic's ValidationError."""
        return cls.model_validate(params)

    def to_stored(self) -> dict[str, Any]:
        """The JSON dict for ``jobs.params``: flat, in the WebUI's names, lists for tuples."""
        return self.model_dump(mode="json")

    # -- derived values the engine and the runner share ----------------------------------------------

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def hires_enabled(self) -> bool:
        """Hires fix runs: asked for, and a txt2img job (img2img has none)."""
        return self.mode == "txt2img" and self.enable_hr

    @property
    def hires_sampler(self) -> tuple[str, str]:
        """(sampler, schedule type) of the hires pass, the first pass's where not set."""
        return self.hr_sampler_name or self.sampler_name, self.hr_scheduler or self.scheduler

    @property
    def batch_key(self) -> BatchKey | None:
        """What jobs must share to be denoised in one batch; None: this job is never batched with others
        (``batch_invariant``). The one definition the claim groups on (stored digested, see
        :attr:`batch_key_digest`) and the engine groups a batch by.

        Shared: the checkpoint (by the name the worker loads it under), VAE and its hash, latent size,
        sampler and schedule type, the step plan (steps and, where it shapes the schedule, the denoising
        strength), mode, the hires pass, clip skip, and the LoRA set with weights in its order (LoRAs are
        merged into the shared weights, and their order changes the floating-point sums). Per image, so
        free to differ: prompts and negative prompts (embeddings only change their own prompt's
        encoding), seeds, variation seeds, ENSD, CFG scale, batch size and count, init images, masks
        and the inpainting settings (they prepare each image's latents at the shared size), styles
        (already in the prompt), face restoration (after decoding) and the output format. ControlNet units share
        their models (one per unit position); their images, weights, modes and guidance windows are per image.
        """
        if self.batch_invariant:
            return None
        hires: BatchKey = ()
        if self.hires_enabled:
            hires = (self.hr_scale, self.hr_resize_x, self.hr_resize_y, self.hr_upscaler,
                     self.hr_second_pass_steps or self.steps, *self.hires_sampler)
            if self.hr_upscaler_file is not None:  # keys of jobs without a model upscaler stay what they were
                hires += (self.hr_upscaler_file, self.upscaler_tile, self.upscaler_tile_overlap)
        strength = self.denoising_strength if self.mode == "img2img" or self.hires_enabled else None
        loras = tuple((lora.file, lora.hash or "", lora.weight) for lora in self.loras)
        key: BatchKey = (
            CONTRACT_VERSION, self.model, self.vae, self.vae_hash, self.mode, self.width, self.height,
            self.sampler_name, self.scheduler, self.steps, strength, hires, self.clip_skip, loras,
        )
        if self.controlnet:  # keys of jobs without units stay what they were
            key += (tuple((unit.model_location, unit.model_title) for unit in self.controlnet),)
        if self.hypernetworks:  # likewise for hypernetworks
            key += (("hypernet", *((h.file, h.multiplier) for h in self.hypernetworks)),)
        return key

    @property
    def batch_key_digest(self) -> str | None:
        """:attr:`batch_key` as the short stable string ``jobs.batch_key`` stores and the claim compares."""
        key = self.batch_key
        if key is None:
            return None
        return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()[:32]


class UpscaleSpec(BaseModel):
    """An upscale job (the WebUI's Extras tab, ``run_extras``): its images upscaled, no diffusion.

    ``images`` are the object-store keys of the staged inputs; ``infotexts`` the generation parameters each
    source image carried (kept in the output's ``parameters`` chunk, as the WebUI keeps them). Upscalers are
    named as the WebUI names them, with the file a worker opens (None for the built-ins)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1  # CONTRACT_VERSION
    mode: Literal["upscale"] = "upscale"
    images: tuple[str, ...]
    infotexts: tuple[str | None, ...] = ()
    resize_mode: Literal[0, 1] = Field(0, description="0 scale by upscaling_resize, 1 scale to width x height")
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_1_file: str | None = None
    upscaler_2: str = "None"
    upscaler_2_file: str | None = None
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    upscaler_tile: int = 192
    upscaler_tile_overlap: int = 8
    output_format: Literal["png", "jpeg", "webp"] = "png"
    seed: int = Field(-1, description="none: an upscale draws no noise")

    @property
    def image_count(self) -> int:
        return len(self.images)

    @property
    def batch_key(self) -> BatchKey | None:
        """Upscale jobs are never batched with others (each image is its own model pass)."""
        return None

    @classmethod
    def from_stored(cls, params: dict[str, Any]) -> UpscaleSpec:
        return cls.model_validate(params)

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


JobSpec = RenderSpec | UpscaleSpec | TrainSpec


def parse_job_spec(params: dict[str, Any]) -> JobSpec:
    """The contract of a ``jobs.params`` row, by its mode; raises pydantic's ValidationError."""
    if params.get("mode") == "upscale":
        return UpscaleSpec.from_stored(params)
    if params.get("mode") == TRAIN_MODE:
        return TrainSpec.from_stored(params)
    return RenderSpec.from_stored(params)


def _prompt_tag_loras(prompt: str) -> list[dict[str, Any]]:
    """The LoRA set of a row written before rows carried ``loras``: the prompt's tags, by file name.

    Malformed tags render without LoRA, as the prompt stripper treats them.
    """
    try:
        tags = extract_lora_tags(prompt)[1]
    except ValueError:
        return []
    return [{"name": name, "weight": weight} for name, weight in tags]
