"""The generation engine: jobs' parameters rendered the way the AUTOMATIC1111 WebUI renders them.

Order as in diffusers' pipelines: check inputs -> encode prompts -> prepare latents -> denoise ->
decode. The unit is a batch (:mod:`batch`): the jobs one claim took together. Each job is planned
alone (its prompts encoded, its inputs read: a bad input fails that job only); then its images join
the batch's UNet calls, at most ``BatchLimits.images_per_call`` images each (``batch_invariant`` jobs:
one), with per-image noise, conditioning and CFG scale (:mod:`denoise`). Everything runs on the
components of the loaded pipeline (tokenizer, text encoder, UNet, VAE) with a scheduler built per UNet
batch from the checkpoint's pristine config, so nothing a job does is left behind for the next one.
The WebUI's behaviour lives in small modules:
:mod:`conditioning` (prompt syntax), :mod:`noise` (seeds), :mod:`denoise` (the loop and guidance),
:mod:`img2img` (init images and masks), :mod:`hires` (hires fix), :mod:`vae`, :mod:`embeddings`.

SDXL pipelines (two text encoders) get their conditioning from :mod:`sdxl_conditioning`, with the size
conditioning of each pass (the hires pass at its target size); everything else is shared, LoRAs included
(kohya and diffusers SDXL files, UNet and both text encoders) and textual-inversion embeddings in the SDXL
format (``clip_l`` + ``clip_g``); a prompt naming an embedding SDXL cannot apply fails as a user error.

Out of scope: 9-channel inpainting checkpoints (the loader refuses them), refiner / hires checkpoint,
color correction, face restoration, tiling, NGMS and the other
WebUI options that change sampling.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from shared.controlnet.models import controlnet_path
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from worker.engine import hires as hires_fix
from worker.engine.batch import BatchJob, BatchLimits, JobStep
from worker.engine.conditioning import JobConditioning, PromptEncoder, build_conditioning
from worker.engine.controlnet import ControlNetLoader, ImageControl, UnitPlan, prepare_units
from worker.engine.denoise import (
    DenoiseItem,
    InpaintBlend,
    PhasePlan,
    new_scheduler,
    plan_phase,
    run_phase,
    start_latents,
)
from worker.engine.embeddings import EmbeddingLibrary
from worker.engine.hypernetworks import Hypernetwork, load_hypernetwork
from worker.engine.hypernetworks import applied as applied_hypernetworks
from worker.engine.img2img import (
    Img2ImgInputs,
    apply_overlay,
    latent_mask_tensors,
    prepare_img2img,
    read_stored_image,
    resize_image,
)
from worker.engine.lora import LoraCache, job_loras, lora_infotext
from worker.engine.noise import LATENT_CHANNELS, LATENT_FACTOR, ImageNoise, SeedPlan, cpu_randn, job_seed_plans
from worker.engine.sdxl_conditioning import (
    SdxlEmbeddingLibrary,
    SdxlPromptEncoder,
    is_sdxl_pipeline,
    sdxl_prompt_encoder,
    sdxl_time_ids,
)
from worker.engine.vae import OUT_OF_MEMORY, VaeChoice, VaeLibrary, decode_images, encode_image

log = logging.getLogger(__name__)
StepCallback = Callable[[int, int], None]
ImageLoader = Callable[[str], bytes]
UpscalerLoader = Callable[[str], Any]  # a model upscaler's file (relative to the models folder) -> LoadedUpscaler
FaceRestorerLoader = Callable[[], Any]  # -> worker.engine.face_restoration.FaceRestorer


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
    control: tuple[UnitPlan, ...] = ()

    def image_control(self, hires: bool = False) -> ImageControl | None:
        return ImageControl(self.control, hires) if self.control else None


class GenerationEngine:
    """Renders jobs; holds the per-process caches (VAE variants, parsed embeddings) that jobs share."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.embeddings = EmbeddingLibrary(self.models_dir / "embeddings")
        self.sdxl_embeddings = SdxlEmbeddingLibrary(self.models_dir / "embeddings")
        self.vaes = VaeLibrary(self.models_dir / "VAE")
        self._hypernet_cache: dict[tuple[str, int, int, str, str], Hypernetwork] = {}
        # Lowered after a CUDA out-of-memory error: images per UNet call this process found to fit.
        self.max_images_learned: int | None = None
        # Callers that hold no LoraCache of their own (tests, tools) get one per pipeline, weakly keyed.
        self._loras: weakref.WeakKeyDictionary[Any, LoraCache] = weakref.WeakKeyDictionary()
        # ...and ControlNets loaded on first use, by location (the worker passes its pipeline cache's loader).
        self._controlnets: dict[tuple[str, str, str], Any] = {}
        self._upscalers: dict[str, Any] = {}
        self._face_restorer: Any = None

    def controlnet_loader(self, pipe: Any) -> ControlNetLoader:
        """Loads a unit's ControlNet onto ``pipe``'s device and dtype, once per process (tests and tools)."""
        from worker.engine.controlnet_loader import load_controlnet

        device, dtype = str(pipe.unet.device), pipe.unet.dtype

        def load(unit: Any) -> Any:
            key = (unit.model_location, device, str(dtype))
            if key not in self._controlnets:
                self._controlnets[key] = load_controlnet(controlnet_path(self.models_dir, unit.model_location),
                                                                device, dtype)
            return self._controlnets[key]

        return load

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
        limits: BatchLimits | None = None,
        controlnets: ControlNetLoader | None = None,
        upscalers: UpscalerLoader | None = None,
        face_restorer: FaceRestorerLoader | None = None,
    ) -> list[RenderedImage]:
        """Every image of one job, in order (a batch of one job; see :meth:`render_batch`). ``on_step(done,
        total)`` counts model evaluations and may raise to cancel; what it raises is raised here."""
        job_id = uuid.uuid4()
        step = (lambda _job, done, total: on_step(done, total)) if on_step is not None else None
        outcome = self.render_batch(pipe, [BatchJob(job_id, spec)], scheduler_config, load_image, step, loras, limits,
                                    controlnets, upscalers, face_restorer)
        result = outcome[job_id]
        if isinstance(result, Exception):
            raise result
        return result

    def render_batch(
        self,
        pipe: Any,
        jobs: Sequence[BatchJob],
        scheduler_config: dict[str, Any],
        load_image: ImageLoader | None = None,
        on_step: JobStep | None = None,
        loras: LoraCache | None = None,
        limits: BatchLimits | None = None,
        controlnets: ControlNetLoader | None = None,
        upscalers: UpscalerLoader | None = None,
        face_restorer: FaceRestorerLoader | None = None,
    ) -> dict[uuid.UUID, list[RenderedImage] | Exception]:
        """Every job of a claimed batch: each job's images in order, or the exception that ended that job
        alone (a FieldError found late, or whatever its ``on_step`` raised). An exception that escapes (a
        broken pipeline) ended the whole batch.

        Jobs are grouped by batch key (a claimed batch is one group); a group's images are denoised
        together, ``limits.images_per_call`` at a time; a ``batch_invariant`` job's images one at a time.
        ``loras`` is the pipeline's LoRA cache: each group's exact LoRA set (or none) is made active before
        anything is encoded. ``controlnets`` loads a unit's ControlNet (the worker's pipeline cache; default: the
        engine's own, loaded on first use); ``upscalers`` likewise loads hires fix's model upscalers, and
        ``face_restorer`` GFPGAN for ``restore_faces``."""
        limits = limits or BatchLimits()
        load_controlnet = controlnets or self.controlnet_loader(pipe)
        cache = loras if loras is not None else self.lora_cache(pipe)
        run = _BatchRun(on_step, upscalers, face_restorer or self.face_restorer_loader())
        groups: dict[object, list[BatchJob]] = {}
        for job in jobs:
            key = job.spec.batch_key or ("alone", job.job_id)  # batch_invariant jobs have no key
            groups.setdefault(key, []).append(job)
        for group in groups.values():
            try:  # the group's one LoRA set (and hypernetworks): a broken file is every one of its jobs' input error
                requests = job_loras(group[0].spec, self.models_dir / "Lora")
                cache.apply(pipe, requests)
                hypernets = self._hypernetworks(group[0].spec, pipe.unet)
            except FieldError as exc:
                for job in group:
                    run.fail(job.job_id, exc)
                continue
            slots: list[_Slot] = []
            for job in group:
                try:
                    plan, count = self._plan(pipe, job.spec, scheduler_config, load_image, load_controlnet)
                except FieldError as exc:
                    run.fail(job.job_id, exc)
                    continue
                plan.extras.update(lora_infotext(requests, cache))
                slots += run.add_job(job.job_id, plan, count)
            spec = group[0].spec
            per_call = 1 if spec.batch_invariant else min(limits.images_per_call(spec.width, spec.height),
                                                          self.max_images_learned or limits.max_images)
            with applied_hypernetworks(pipe.unet, hypernets):
                for start in range(0, len(slots), per_call):
                    self._render_chunk(pipe, slots[start : start + per_call], run)
        return run.results()

    def _hypernetworks(self, spec: RenderSpec, unet: Any) -> list[tuple[Hypernetwork, float]]:
        """The spec's hypernetworks, loaded once per file version and kept on the UNet's device and dtype."""
        found = []
        for wanted in spec.hypernetworks:
            path = self.models_dir / "hypernetworks" / wanted.file
            if not path.is_file():
                raise FieldError(("body", "prompt"), f"hypernetwork {wanted.name!r} ({wanted.file}) is not installed "
                                                     "on this worker")
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size, str(unet.device), str(unet.dtype))
            if key not in self._hypernet_cache:
                self._hypernet_cache = {k: v for k, v in self._hypernet_cache.items() if k[0] != str(path)}
                self._hypernet_cache[key] = load_hypernetwork(path).to(unet.device, unet.dtype)
            found.append((self._hypernet_cache[key], wanted.multiplier))
        return found

    # -- check inputs, encode prompts --------------------------------------------------------------

    def _plan(self, pipe: Any, spec: RenderSpec, scheduler_config: dict[str, Any],
              load_image: ImageLoader | None, load_controlnet: ControlNetLoader) -> tuple[_Job, int]:
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
        if spec.controlnet:
            hires_size = (hires.target_width, hires.target_height) if hires is not None and second is not None else None
            job.control = prepare_units(spec, load_image, load_controlnet, hires_size, self.models_dir,
                                        str(pipe.unet.device))
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

    def _render_chunk(self, pipe: Any, slots: list[_Slot], run: _BatchRun) -> None:
        """One batch of images through both passes and the VAE; on a CUDA out-of-memory error the batch is
        split in halves and each half rendered again, and later batches are no larger than a half."""
        slots = [slot for slot in slots if slot.job_id not in run.outcomes]
        if not slots:
            return
        try:
            with torch.no_grad():
                images = self._denoise_chunk(pipe, slots, run)
        except OUT_OF_MEMORY:
            if len(slots) == 1:
                raise
            half = len(slots) // 2
            self.max_images_learned = max(1, half)
            log.warning("out of GPU memory with %d images in one call; splitting, and calling with at most %d "
                        "from now on", len(slots), half)
            _empty_device_cache()
            self._render_chunk(pipe, slots[:half], run)
            self._render_chunk(pipe, slots[half:], run)
            return
        for slot, image in images.items():
            run.finish(slot, image, len(slots))

    def _denoise_chunk(self, pipe: Any, slots: list[_Slot], run: _BatchRun) -> dict[_Slot, Image.Image]:
        job, device = slots[0].job, pipe.unet.device
        shape = (LATENT_CHANNELS, job.spec.height // LATENT_FACTOR, job.spec.width // LATENT_FACTOR)
        prepared = [self._prepare(pipe, slot, shape, run) for slot in slots]
        slots = [slot for slot, ok in zip(slots, prepared, strict=True) if ok]
        if not slots:
            return {}
        scheduler, timesteps = new_scheduler(job.scheduler_config, job.first, [s.plan.seed for s in slots], device)
        initial = torch.stack([slot.initial for slot in slots]).to(device)
        init = torch.stack([slot.init_latent for slot in slots]).to(device) if job.inputs is not None else None
        latents = start_latents(scheduler, timesteps, initial, init)
        items = [DenoiseItem(slot, slot.job.cond, slot.job.spec.cfg_scale, slot.noise.step_generator(), slot.blend,
                             slot.job.image_control())
                 for slot in slots]
        latents, items = run_phase(pipe.unet, scheduler, timesteps, latents, items, run.after_eval)
        slots = [item.key for item in items]  # type: ignore[misc]
        if job.hires is not None and slots:
            latents, slots = self._hires_pass(pipe, slots, latents, run)
        if job.inputs is not None:
            latents = torch.cat([
                latent[None] * slot.blend.regenerate + slot.blend.init_latent * slot.blend.keep
                if slot.blend is not None else latent[None]
                for slot, latent in zip(slots, latents, strict=True)
            ]) if slots else latents
        per_call = max(1, len(slots))
        decoded = decode_images(job.vae.module, latents, per_call)
        return {slot: _finish_image(slot, self._restore_faces(slot, image, run))
                for slot, image in zip(slots, decoded, strict=True)}

    def _restore_faces(self, slot: _Slot, image: Image.Image, run: _BatchRun) -> Image.Image:
        """``restore_faces``: GFPGAN on the decoded image, before the inpainting overlay (``process_images_inner``)."""
        if not slot.job.spec.restore_faces or run.load_face_restorer is None:
            return image
        from worker.engine.face_restoration import FaceRestorationUnavailable, restore_faces

        try:
            restorer = run.load_face_restorer()
        except FaceRestorationUnavailable as exc:
            raise FieldError(("body", "restore_faces"), f"face restoration is not available: {exc}") from exc
        return restore_faces(restorer, image)

    def face_restorer_loader(self) -> FaceRestorerLoader:
        """Loads the face restorer once per process (tests and tools; the worker passes its pipeline cache's)."""
        from worker.engine.face_restoration import load_face_restorer

        def load() -> Any:
            if self._face_restorer is None:
                self._face_restorer = load_face_restorer(self.models_dir)
            return self._face_restorer

        return load

    def _prepare(self, pipe: Any, slot: _Slot, shape: tuple[int, int, int], run: _BatchRun) -> bool:
        """An image's starting point: its noise, and for img2img its init latent and inpainting blend. False
        when its job failed here (the failure is the job's outcome)."""
        job, device = slot.job, pipe.unet.device
        if job.inputs is None:
            slot.noise = ImageNoise(slot.plan, shape)
            slot.initial = slot.noise.initial()
            return True
        try:
            inputs = job.inputs
            source = inputs.images[slot.batch_index if len(inputs.images) > 1 else 0]
            init_latent = encode_image(job.vae.module, source, slot.plan.seed)
            if job.spec.resize_mode == 3:  # "just resize (latent upscale)"
                init_latent = torch.nn.functional.interpolate(init_latent, size=shape[1:], mode="bilinear")
            latent_shape = tuple(init_latent.shape[1:])
            if inputs.latent_mask is not None:
                keep, regenerate = latent_mask_tensors(inputs.latent_mask, latent_shape)
                fill = job.spec.inpainting_fill
                if fill == 2:  # latent noise: the seed's own noise (the WebUI's create_random_tensors)
                    init_latent = init_latent * keep + cpu_randn(slot.plan.seed, latent_shape) * regenerate
                elif fill == 3:  # latent nothing
                    init_latent = init_latent * keep
                slot.blend = InpaintBlend(init_latent[0].to(device), keep.to(device), regenerate.to(device))
        except FieldError as exc:
            run.fail(slot.job_id, exc)
            return False
        slot.init_latent = init_latent[0]
        slot.noise = ImageNoise(slot.plan, latent_shape)  # type: ignore[arg-type]
        slot.initial = slot.noise.initial()
        return True

    def _hires_upscale(self, image: Image.Image, hires: hires_fix.HiresPlan, load_upscaler: UpscalerLoader | None
                       ) -> Image.Image:
        """The decoded first pass at the second pass's size: a model upscaler, or a built-in resize."""
        if hires.upscaler_file is None:
            return resize_image(0, image, hires.target_width, hires.target_height, upscaler=hires.upscaler)
        from worker.engine.upscalers import UpscalerRefused, upscale_to

        loader = load_upscaler or self.upscaler_loader()
        try:
            model = loader(hires.upscaler_file)
        except UpscalerRefused as exc:
            raise FieldError(("body", "hr_upscaler"), f"hr_upscaler {hires.upscaler!r} cannot be used: {exc}") from exc
        return upscale_to(model, image, hires.target_width, hires.target_height, *hires.tile)

    def upscaler_loader(self) -> UpscalerLoader:
        """Loads upscaler models once per process (tests and tools; the worker passes its pipeline cache's)."""
        from worker.engine.upscalers import load_upscaler

        def load(location: str) -> Any:
            if location not in self._upscalers:
                self._upscalers[location] = load_upscaler(self.models_dir / location)
            return self._upscalers[location]

        return load

    def _hires_pass(self, pipe: Any, slots: list[_Slot], latents: torch.Tensor, run: _BatchRun
                    ) -> tuple[torch.Tensor, list[_Slot]]:
        job = slots[0].job
        hires, vae, device = job.hires, job.vae.module, pipe.unet.device
        assert hires is not None
        if hires.latent_mode is not None:
            upscaled = hires_fix.upscale_latent(latents, hires)
        else:
            images = decode_images(vae, latents, len(slots))
            upscaled = torch.cat([
                encode_image(vae, self._hires_upscale(image, hires, run.load_upscaler), slot.plan.seed)
                for slot, image in zip(slots, images, strict=True)
            ])
        upscaled = hires_fix.truncate_latent(upscaled.float(), hires).to(device)
        if job.second is None or job.hr_cond is None:
            return upscaled, slots
        shape = tuple(upscaled.shape[1:])
        noises = [ImageNoise(slot.plan, shape) for slot in slots]  # type: ignore[arg-type]
        initial = torch.stack([noise.initial() for noise in noises]).to(device)
        scheduler, timesteps = new_scheduler(job.scheduler_config, job.second, [s.plan.seed for s in slots], device)
        start = start_latents(scheduler, timesteps, initial, upscaled)
        items = [DenoiseItem(slot, slot.job.hr_cond, slot.job.spec.cfg_scale, noise.step_generator(),
                             control=slot.job.image_control(hires=True))
                 for slot, noise in zip(slots, noises, strict=True) if slot.job.hr_cond is not None]
        latents, items = run_phase(pipe.unet, scheduler, timesteps, start, items, run.after_eval)
        return latents, [item.key for item in items]  # type: ignore[misc]


def _empty_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finish_image(slot: _Slot, image: Image.Image) -> Image.Image:
    inputs = slot.job.inputs
    if inputs is None:
        return image
    overlay = None
    if inputs.overlays:
        overlay = inputs.overlays[slot.batch_index if len(inputs.overlays) > 1 else 0]
    return apply_overlay(image, inputs.paste_to, overlay)


@dataclass(eq=False)
class _Slot:
    """One image of a batch: its job, its place in the job, its seeds and its starting point."""

    job_id: uuid.UUID
    job: _Job
    index: int  # the image's index in its job's outputs
    plan: SeedPlan
    batch_index: int  # which init image / overlay of the job it uses
    noise: ImageNoise = field(init=False)
    initial: torch.Tensor = field(init=False)
    init_latent: torch.Tensor | None = None
    blend: InpaintBlend | None = None


class _BatchRun:
    """The jobs of one render_batch call: their images, evaluation counts and outcomes."""

    def __init__(self, on_step: JobStep | None, load_upscaler: UpscalerLoader | None = None,
                 load_face_restorer: FaceRestorerLoader | None = None) -> None:
        self.on_step = on_step
        self.load_upscaler = load_upscaler
        self.load_face_restorer = load_face_restorer
        self.outcomes: dict[uuid.UUID, Exception] = {}
        self.images: dict[uuid.UUID, list[RenderedImage | None]] = {}
        self.done: dict[uuid.UUID, int] = {}
        self.total: dict[uuid.UUID, int] = {}
        self.order: list[uuid.UUID] = []

    def add_job(self, job_id: uuid.UUID, job: _Job, count: int) -> list[_Slot]:
        plans = job_seed_plans(job.spec, count)
        per_image = job.first.evals + (job.second.evals if job.second else 0)
        self.order.append(job_id)
        self.images[job_id] = [None] * len(plans)
        self.done[job_id], self.total[job_id] = 0, max(1, per_image * len(plans))
        batch = count // max(1, job.spec.n_iter)
        return [_Slot(job_id, job, k, plan, k % batch) for k, plan in enumerate(plans)]

    def fail(self, job_id: uuid.UUID, exc: Exception) -> None:
        self.outcomes.setdefault(job_id, exc)

    def after_eval(self, keys: list[Hashable]) -> set[Hashable]:
        """Count one evaluation for every image still in the batch; a job whose step callback raises leaves
        the batch (all its images) with that exception as its outcome."""
        slots = [key for key in keys if isinstance(key, _Slot)]
        for slot in slots:
            self.done[slot.job_id] += 1
        for job_id in dict.fromkeys(slot.job_id for slot in slots):
            if self.on_step is None or job_id in self.outcomes:
                continue
            try:
                self.on_step(job_id, min(self.done[job_id], self.total[job_id]), self.total[job_id])
            except Exception as exc:  # noqa: BLE001 - the job's own outcome (cancel, time limit)
                self.fail(job_id, exc)
        return {slot for slot in slots if slot.job_id in self.outcomes}

    def finish(self, slot: _Slot, image: Image.Image, batch_images: int) -> None:
        if slot.job_id in self.outcomes:
            return
        self.images[slot.job_id][slot.index] = RenderedImage(
            slot.index, slot.plan.seed, image, slot.plan.subseed, batch_images, dict(slot.job.extras))

    def results(self) -> dict[uuid.UUID, list[RenderedImage] | Exception]:
        results: dict[uuid.UUID, list[RenderedImage] | Exception] = dict(self.outcomes)
        for job_id in self.order:
            if job_id not in results:
                images = self.images[job_id]
                if any(image is None for image in images):  # cannot happen: every slot either finished or failed
                    raise RuntimeError(f"job {job_id}: images missing from its batch")
                results[job_id] = [image for image in images if image is not None]
        return results


def _load_inputs(spec: RenderSpec, load_image: ImageLoader | None) -> Img2ImgInputs:
    keys = spec.init_images
    if not keys:
        raise FieldError(("body", "init_images"), "init_images: img2img needs at least one init image")
    if load_image is None:
        raise FieldError(("body", "init_images"), "init_images: this worker was given no image store to read them from")
    images = [read_stored_image(key, load_image, ("body", "init_images")) for key in keys]
    mask = read_stored_image(spec.mask, load_image, ("body", "mask")) if spec.mask else None
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
