"""The generation engine: a job's parameters rendered the way the AUTOMATIC1111 WebUI renders them.

Order as in diffusers' pipelines: check inputs -> encode prompts -> prepare latents -> denoise ->
decode. Everything runs on the components of the loaded pipeline (tokenizer, text encoder, UNet,
VAE) with a scheduler built per image from the checkpoint's pristine config, so nothing a job does
is left behind for the next one. The WebUI's behaviour lives in small modules:
:mod:`conditioning` (prompt syntax), :mod:`noise` (seeds), :mod:`denoise` (the loop and guidance),
:mod:`img2img` (init images and masks), :mod:`hires` (hires fix), :mod:`vae`, :mod:`embeddings`.

SDXL pipelines (two text encoders) get their conditioning from :mod:`sdxl_conditioning`, with the size
conditioning of each pass (the hires pass at its target size); everything else is shared, LoRAs included
(kohya and diffusers SDXL files, UNet and both text encoders) and textual-inversion embeddings in the SDXL
format (``clip_l`` + ``clip_g``); a prompt naming an embedding SDXL cannot apply fails as a user error.

Out of scope: 9-channel inpainting checkpoints (the loader refuses them), refiner / hires checkpoint,
ESRGAN upscalers (see :mod:`hires`), color correction, face restoration, tiling, NGMS and the other
WebUI options that change sampling.
"""

from __future__ import annotations

import io
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.storage.base import ObjectNotFoundError
from worker.engine import hires as hires_fix
from worker.engine.batch import BatchJob, BatchLimits, JobStep
from worker.engine.conditioning import JobConditioning, PromptEncoder, build_conditioning
from worker.engine.denoise import (
    InpaintBlend,
    PhasePlan,
    new_scheduler,
    plan_phase,
    run_phase,
    start_latents,
)
from worker.engine.embeddings import EmbeddingLibrary
from worker.engine.img2img import Img2ImgInputs, apply_overlay, latent_mask_tensors, prepare_img2img, resize_image
from worker.engine.lora import LoraCache, job_loras, lora_infotext
from worker.engine.noise import LATENT_CHANNELS, LATENT_FACTOR, ImageNoise, SeedPlan, cpu_randn, job_seed_plans
from worker.engine.sdxl_conditioning import (
    SdxlEmbeddingLibrary,
    SdxlPromptEncoder,
    is_sdxl_pipeline,
    sdxl_prompt_encoder,
    sdxl_time_ids,
)
from worker.engine.vae import VaeChoice, VaeLibrary, decode_to_image, encode_image

StepCallback = Callable[[int, int], None]
ImageLoader = Callable[[str], bytes]


@dataclass
class RenderedImage:
    index: int
    seed: int
    image: Image.Image
    subseed: int = -1
    batch_images: int = 1  # images in the UNet calls that rendered it (its effective batch size)
    # Infotext keys only the engine knows (VAE, TI hashes, inpainting facts), in WebUI spelling.
    infotext: dict[str, object] = field(default_factory=dict)


@dataclass
class _Job:
    """A job's resolved plan: passes, conditioning, VAE and inputs, shared by all its images."""

    spec: RenderSpec
    scheduler_config: dict[str, Any]
    first: PhasePlan
    cond: JobConditioning
    vae: VaeChoice
    hires: hires_fix.HiresPlan | None = None
    second: PhasePlan | None = None
    hr_cond: JobConditioning | None = None
    inputs: Img2ImgInputs | None = None
    extras: dict[str, object] = field(default_factory=dict)


class GenerationEngine:
    """Renders jobs; holds the per-process caches (VAE variants, parsed embeddings) that jobs share."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.embeddings = EmbeddingLibrary(self.models_dir / "embeddings")
        self.sdxl_embeddings = SdxlEmbeddingLibrary(self.models_dir / "embeddings")
        self.vaes = VaeLibrary(self.models_dir / "VAE")
        # Callers that hold no LoraCache of their own (tests, tools) get one per pipeline, weakly keyed.
        self._loras: weakref.WeakKeyDictionary[Any, LoraCache] = weakref.WeakKeyDictionary()

    def lora_cache(self, pipe: Any) -> LoraCache:
        """The engine's own LoRA cache for ``pipe`` (used when ``render`` is given none)."""
        if pipe not in self._loras:
            self._loras[pipe] = LoraCache()
        return self._loras[pipe]

    def render(
        self,
        pipe: Any,
        spec: RenderSpec,
        scheduler_config: dict[str, Any],
        load_image: ImageLoader | None = None,
        on_step: StepCallback | None = None,
        loras: LoraCache | None = None,
    ) -> list[RenderedImage]:
        """Every image of a job, in order. ``on_step(done, total)`` counts model evaluations and may raise
        to cancel; ``load_image(key)`` returns the bytes of an uploaded init image or mask. ``loras`` is the
        pipeline's LoRA cache; the job's exact LoRA set (or none) is made active before anything is encoded."""
        requests = job_loras(spec, self.models_dir / "Lora")
        cache = loras if loras is not None else self.lora_cache(pipe)
        cache.apply(pipe, requests)
        job, count = self._plan(pipe, spec, scheduler_config, load_image)
        job.extras.update(lora_infotext(requests, cache))
        plans = job_seed_plans(spec, count)
        per_image = job.first.evals + (job.second.evals if job.second else 0)
        total, done = max(1, per_image * len(plans)), 0

        def on_eval() -> None:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, total)

        batch = count // max(1, spec.n_iter)
        results = []
        for k, plan in enumerate(plans):
            with torch.no_grad():
                image = self._render_one(pipe, job, plan, k % batch, on_eval)
            results.append(RenderedImage(k, plan.seed, image, plan.subseed, dict(job.extras)))
        return results

    def render_batch(
        self,
        pipe: Any,
        jobs: Sequence[BatchJob],
        scheduler_config: dict[str, Any],
        load_image: ImageLoader | None = None,
        on_step: JobStep | None = None,
        loras: LoraCache | None = None,
        limits: BatchLimits | None = None,
    ) -> dict[uuid.UUID, list[RenderedImage] | Exception]:
        """Every job of a claimed batch (one batch key): each job's images in order, or the exception that
        ended that job alone (a FieldError found late, or whatever its ``on_step`` raised). An exception
        that escapes (a broken pipeline) ended the whole batch."""
        outcomes: dict[uuid.UUID, list[RenderedImage] | Exception] = {}
        for job in jobs:  # provisional: one job after the other
            step = (lambda done, total, jid=job.job_id: on_step(jid, done, total)) if on_step else None
            try:
                outcomes[job.job_id] = self.render(pipe, job.spec, scheduler_config, load_image, step, loras)
            except Exception as exc:  # noqa: BLE001 - the job's own outcome
                outcomes[job.job_id] = exc
        return outcomes

    # -- check inputs, encode prompts --------------------------------------------------------------

    def _plan(self, pipe: Any, spec: RenderSpec, scheduler_config: dict[str, Any],
              load_image: ImageLoader | None) -> tuple[_Job, int]:
        batch = spec.batch_size
        is_img2img = spec.mode == "img2img"
        first = plan_phase(scheduler_config, spec.sampler_name, spec.scheduler, spec.steps,
                           spec.denoising_strength if is_img2img else None)
        vae = self.vaes.choose(spec.vae, pipe.vae)
        inputs = None
        if is_img2img:
            inputs = _load_inputs(spec, load_image)
            if len(inputs.images) > 1:
                if len(inputs.images) > batch:
                    raise FieldError(("body", "init_images"), f"init_images: {len(inputs.images)} images given; "
                                     f"expected 1 or at most batch_size ({batch})")
                batch = len(inputs.images)
        hires = second = None
        if spec.hires_enabled:
            hires = hires_fix.hires_plan(spec)
            if hires.denoising_strength > 0:
                second = plan_phase(scheduler_config, hires.sampler_name, hires.scheduler, hires.steps,
                                    hires.denoising_strength, fixed_steps=True)

        encoder = self._prompt_encoder(pipe, spec, hires)
        cond = build_conditioning(encoder, spec.prompt, spec.negative_prompt, first.schedule_steps)
        sdxl = is_sdxl_pipeline(pipe)
        if sdxl:
            cond.time_ids = sdxl_time_ids(spec.width, spec.height)
        job = _Job(spec, dict(scheduler_config), first, cond, vae, hires, second, inputs=inputs)
        if hires is not None and second is not None:
            job.hr_cond = build_conditioning(encoder, hires.prompt, hires.negative_prompt, second.schedule_steps,
                                             hires_base_steps=first.schedule_steps)
            if sdxl:
                job.hr_cond.time_ids = sdxl_time_ids(hires.target_width, hires.target_height)
        job.extras = _engine_infotext(vae, encoder, inputs)
        return job, batch * spec.n_iter

    def _prompt_encoder(self, pipe: Any, spec: RenderSpec,
                        hires: hires_fix.HiresPlan | None) -> PromptEncoder | SdxlPromptEncoder:
        if is_sdxl_pipeline(pipe):
            prompts = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt}
            if hires is not None:
                prompts.update(hr_prompt=hires.prompt, hr_negative_prompt=hires.negative_prompt)
            return sdxl_prompt_encoder(pipe, self.sdxl_embeddings, self.embeddings.names(), prompts)
        width = int(pipe.text_encoder.get_input_embeddings().weight.shape[-1])
        return PromptEncoder(pipe.tokenizer, pipe.text_encoder, self.embeddings.available(width), spec.clip_skip)

    # -- prepare latents, denoise, decode ----------------------------------------------------------

    def _render_one(self, pipe: Any, job: _Job, plan: SeedPlan, batch_index: int,
                    on_eval: Callable[[], None]) -> Image.Image:
        if job.inputs is not None:
            return self._img2img_one(pipe, job, plan, batch_index, on_eval)
        spec, device = job.spec, pipe.unet.device
        shape = (LATENT_CHANNELS, spec.height // LATENT_FACTOR, spec.width // LATENT_FACTOR)
        noise = ImageNoise(plan, shape)
        initial = noise.initial()[None].to(device)
        scheduler, timesteps = new_scheduler(job.scheduler_config, job.first, plan.seed, device)
        latents = start_latents(scheduler, timesteps, initial, None)
        latents = run_phase(pipe.unet, scheduler, timesteps, latents, job.cond, spec.cfg_scale,
                            noise.step_generator(), on_eval)
        if job.hires is not None:
            latents = self._hires_pass(pipe, job, plan, latents, on_eval)
        return decode_to_image(job.vae.module, latents)

    def _hires_pass(self, pipe: Any, job: _Job, plan: SeedPlan, latents: torch.Tensor,
                    on_eval: Callable[[], None]) -> torch.Tensor:
        hires, vae = job.hires, job.vae.module
        assert hires is not None
        if hires.latent_mode is not None:
            upscaled = hires_fix.upscale_latent(latents, hires)
        else:
            image = decode_to_image(vae, latents)
            image = resize_image(0, image, hires.target_width, hires.target_height, upscaler=hires.upscaler)
            upscaled = encode_image(vae, image, plan.seed)
        upscaled = hires_fix.truncate_latent(upscaled.float(), hires).to(pipe.unet.device)
        if job.second is None or job.hr_cond is None:
            return upscaled
        noise = ImageNoise(plan, tuple(upscaled.shape[1:]))
        initial = noise.initial()[None].to(pipe.unet.device)
        scheduler, timesteps = new_scheduler(job.scheduler_config, job.second, plan.seed, pipe.unet.device)
        start = start_latents(scheduler, timesteps, initial, upscaled)
        return run_phase(pipe.unet, scheduler, timesteps, start, job.hr_cond, job.spec.cfg_scale,
                         noise.step_generator(), on_eval)

    def _img2img_one(self, pipe: Any, job: _Job, plan: SeedPlan, batch_index: int,
                     on_eval: Callable[[], None]) -> Image.Image:
        spec, inputs, vae, device = job.spec, job.inputs, job.vae.module, pipe.unet.device
        assert inputs is not None
        source = inputs.images[batch_index if len(inputs.images) > 1 else 0]
        init_latent = encode_image(vae, source, plan.seed)
        if spec.resize_mode == 3:  # "just resize (latent upscale)"
            size = (spec.height // LATENT_FACTOR, spec.width // LATENT_FACTOR)
            init_latent = torch.nn.functional.interpolate(init_latent, size=size, mode="bilinear")
        shape = tuple(init_latent.shape[1:])
        blend = None
        if inputs.latent_mask is not None:
            keep, regenerate = latent_mask_tensors(inputs.latent_mask, shape)
            fill = spec.inpainting_fill
            if fill == 2:  # latent noise: the seed's own noise (the WebUI's create_random_tensors)
                init_latent = init_latent * keep + cpu_randn(plan.seed, shape) * regenerate
            elif fill == 3:  # latent nothing
                init_latent = init_latent * keep
            blend = InpaintBlend(init_latent.to(device), keep.to(device), regenerate.to(device))
        noise = ImageNoise(plan, shape)
        initial = noise.initial()[None].to(device)
        scheduler, timesteps = new_scheduler(job.scheduler_config, job.first, plan.seed, device)
        latents = start_latents(scheduler, timesteps, initial, init_latent.to(device))
        latents = run_phase(pipe.unet, scheduler, timesteps, latents, job.cond, spec.cfg_scale,
                            noise.step_generator(), on_eval, blend)
        if blend is not None:
            latents = latents * blend.regenerate + blend.init_latent * blend.keep
        image = decode_to_image(vae, latents)
        overlay = None
        if inputs.overlays:
            overlay = inputs.overlays[batch_index if len(inputs.overlays) > 1 else 0]
        return apply_overlay(image, inputs.paste_to, overlay)


def _read_image(key: str, load_image: ImageLoader, field_name: str) -> Image.Image:
    try:
        data = load_image(key)
    except ObjectNotFoundError as exc:
        raise FieldError(("body", field_name), f"{field_name}: no uploaded image under {key!r}") from exc
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FieldError(("body", field_name), f"{field_name}: {key!r} is not a readable image ({exc})") from exc
    return image


def _load_inputs(spec: RenderSpec, load_image: ImageLoader | None) -> Img2ImgInputs:
    keys = spec.init_images
    if not keys:
        raise FieldError(("body", "init_images"), "init_images: img2img needs at least one init image")
    if load_image is None:
        raise FieldError(("body", "init_images"), "init_images: this worker was given no image store to read them from")
    images = [_read_image(key, load_image, "init_images") for key in keys]
    mask = _read_image(spec.mask, load_image, "mask") if spec.mask else None
    return prepare_img2img(images, mask, spec)


def _engine_infotext(vae: VaeChoice, encoder: PromptEncoder | SdxlPromptEncoder,
                     inputs: Img2ImgInputs | None) -> dict[str, object]:
    fields: dict[str, object] = {}
    if vae.name is not None:
        fields["VAE hash"], fields["VAE"] = vae.short_hash, vae.name
    if inputs is not None:
        fields.update(inputs.infotext)
    if encoder.used_embeddings:
        fields["TI hashes"] = ", ".join(
            f"{name.replace(':', '').replace(',', '')}: {embedding.short_hash}"
            for name, embedding in encoder.used_embeddings.items()
        )
    return fields
