"""The generation engine on the tiny demo model at 64x64: seeds, samplers, img2img, inpainting,
hires fix, VAE files, embeddings, malformed prompts and the infotext in PNG/JPEG/WebP outputs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.demo_models.sd15 import build_demo_checkpoint, build_demo_models
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from shared.storage.base import ObjectNotFoundError
from shared.webui.image_metadata import encode_image, read_exif_infotext
from shared.webui.infotext import parse_infotext
from shared.webui.samplers import SAMPLERS
from worker.engine import ldm_layout
from worker.engine.batch import BatchLimits
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.engine import GenerationEngine
from worker.engine.noise import ImageNoise, SeedPlan, cpu_randn
from worker.runner import infotext_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = {
    "mode": "txt2img", "prompt": "a lighthouse, (stormy sea:1.2)", "negative_prompt": "blurry", "steps": 3,
    "cfg_scale": 7.0, "sampler_name": "Euler a", "scheduler": "Automatic", "seed": 1234, "subseed": 99,
    "subseed_strength": 0.0, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "model": "demo",
    "vae": None, "clip_skip": 1, "eta_noise_seed_delta": 0,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    return load_pipeline(build_demo_checkpoint(tmp_path_factory.mktemp("engine") / "demo.safetensors"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "VAE").mkdir()
    (root / "embeddings").mkdir()
    _, vae, _ = build_demo_models(seed=7)  # a different VAE than the checkpoint's own
    ldm = ldm_layout.vae_to_ldm(vae.state_dict(), vae.config)
    save_file({k[len("first_stage_model."):]: v.half().contiguous() for k, v in ldm.items()},
              str(root / "VAE" / "other.vae.safetensors"))
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()},
              str(root / "VAE" / "other-diffusers.safetensors"))
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * 0.5
    save_file({"emb_params": vectors}, str(root / "embeddings" / "glowstyle.safetensors"))
    return root


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> GenerationEngine:
    return GenerationEngine(models_dir)


@pytest.fixture(scope="module")
def store() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    blobs = {}
    for key, size in {"init/a.png": (64, 64), "init/wide.png": (96, 48), "init/big.png": (96, 96)}.items():
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        blobs[key] = png_bytes(Image.fromarray(array))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255  # regenerate the left half
    blobs["mask/left.png"] = png_bytes(Image.fromarray(mask, "L"))
    small = np.zeros((96, 96), dtype=np.uint8)
    small[40:56, 40:56] = 255
    blobs["mask/centre.png"] = png_bytes(Image.fromarray(small, "L"))
    return blobs


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def spec(**overrides) -> RenderSpec:
    return RenderSpec.from_stored({**BASE, **overrides})


def render(pipe, engine, store=None, limits=None, **overrides):
    job = spec(**overrides)
    loader = None
    if store is not None:
        def loader(key: str) -> bytes:
            if key not in store:
                raise ObjectNotFoundError(key)
            return store[key]
    return engine.render(pipe, job, dict(pipe.scheduler.config), load_image=loader, limits=limits)


# -- seeds ------------------------------------------------------------------------------------------

def test_batch_image_k_is_pixel_identical_to_a_single_job_with_seed_plus_k_when_invariant(pipe, engine):
    batch = render(pipe, engine, batch_size=3, n_iter=2, limits=BatchLimits(invariant=True))
    assert [item.seed for item in batch] == [1234 + k for k in range(6)]
    for k, item in enumerate(batch):
        (single,) = render(pipe, engine, seed=1234 + k)
        assert np.array_equal(pixels(item.image), pixels(single.image)), f"image {k} differs"
    assert not np.array_equal(pixels(batch[0].image), pixels(batch[1].image))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "LCM", "DPM++ 2M SDE"])
def test_the_same_job_twice_gives_identical_pixels(pipe, engine, sampler):
    first = render(pipe, engine, sampler_name=sampler, batch_size=2)
    second = render(pipe, engine, sampler_name=sampler, batch_size=2)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(pixels(a.image), pixels(b.image))


def test_variation_strength_0_is_no_variation_and_1_is_the_variation_seed_alone(pipe, engine):
    (plain,) = render(pipe, engine, sampler_name="Euler")
    (zero,) = render(pipe, engine, sampler_name="Euler", subseed=5, subseed_strength=0.0)
    assert np.array_equal(pixels(plain.image), pixels(zero.image))

    full = ImageNoise(SeedPlan(seed=1234, subseed=5, subseed_strength=1.0), (4, 8, 8)).initial()
    assert torch.allclose(full, cpu_randn(5, (4, 8, 8)), atol=1e-5)
    (varied,) = render(pipe, engine, sampler_name="Euler", subseed=5, subseed_strength=1.0)
    (subseed_alone,) = render(pipe, engine, sampler_name="Euler", seed=5)
    assert np.abs(pixels(varied.image) - pixels(subseed_alone.image)).max() <= 2

    # With a variation strength the WebUI keeps the seed and counts the variation seed up.
    batch = render(pipe, engine, sampler_name="Euler", subseed=5, subseed_strength=0.3, batch_size=2)
    assert [(i.seed, i.subseed) for i in batch] == [(1234, 5), (1234, 6)]
    assert not np.array_equal(pixels(batch[0].image), pixels(batch[1].image))


def test_seed_resize_from_keeps_the_centre_of_the_smaller_noise():
    noise = ImageNoise(SeedPlan(1, 2, seed_resize_from_w=32, seed_resize_from_h=32), (4, 8, 8)).initial()
    assert torch.equal(noise[:, 2:6, 2:6], cpu_randn(1, (4, 4, 4)))


def test_ensd_changes_ancestral_samplers_but_not_euler(pipe, engine):
    for sampler, changes in (("Euler a", True), ("Euler", False)):
        (without,) = render(pipe, engine, sampler_name=sampler)
        (with_ensd,) = render(pipe, engine, sampler_name=sampler, eta_noise_seed_delta=31337)
        assert np.array_equal(pixels(without.image), pixels(with_ensd.image)) is not changes


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun"])
def test_a_plain_prompt_matches_the_stock_diffusers_pipeline(pipe, engine, sampler):
    """The hand-written loop is diffusers' loop: same noise, plain prompt -> the same pixels."""
    from worker.engine.scheduling import build_scheduler

    (ours,) = render(pipe, engine, prompt="a red lighthouse", sampler_name=sampler, steps=4)
    stock_pipe = type(pipe)(**{**pipe.components, "scheduler": build_scheduler(pipe.scheduler.config, sampler,
                                                                              "Automatic")})
    stock_pipe.set_progress_bar_config(disable=True)
    out = stock_pipe(prompt="a red lighthouse", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.0,
                     width=64, height=64, latents=cpu_randn(1234, (4, 8, 8))[None], output_type="np").images[0]
    assert np.array_equal(pixels(ours.image), (out * 255).astype(np.int16))


@pytest.mark.parametrize("sampler", [spec.name for spec in SAMPLERS])
def test_every_sampler_renders(pipe, engine, sampler):
    (item,) = render(pipe, engine, sampler_name=sampler, steps=2)
    assert item.image.size == (64, 64)
    assert pixels(item.image).std() > 0


def test_progress_counts_every_evaluation_and_a_raise_cancels(pipe, engine):
    seen: list[tuple[int, int]] = []
    engine.render(pipe, spec(sampler_name="Heun", batch_size=2), dict(pipe.scheduler.config),
                  on_step=lambda done, total: seen.append((done, total)))
    # 2 images x (2*3 - 1) evaluations; both images are in each evaluation of the batch
    assert seen[-1] == (10, 10) and [d for d, _ in seen] == list(range(2, 11, 2))

    class Cancel(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        if done == 2:
            raise Cancel

    with pytest.raises(Cancel):
        engine.render(pipe, spec(), dict(pipe.scheduler.config), on_step=cancel)


def test_scheduled_prompts_are_picked_per_model_evaluation(pipe, engine, monkeypatch):
    from worker.engine.conditioning import JobConditioning

    steps_seen: list[int] = []
    original = JobConditioning.at_step

    def spy(self, step):
        steps_seen.append(step)
        return original(self, step)

    monkeypatch.setattr(JobConditioning, "at_step", spy)
    render(pipe, engine, prompt="a [cat:dog:2]", sampler_name="Heun")
    assert steps_seen == list(range(5))


# -- img2img and inpainting ---------------------------------------------------------------------

@pytest.mark.parametrize("resize_mode", [0, 1, 2, 3])
def test_img2img_resize_modes_give_the_requested_size(pipe, engine, store, resize_mode):
    items = render(pipe, engine, store, mode="img2img", init_images=["init/wide.png"], resize_mode=resize_mode,
                   denoising_strength=0.6, batch_size=2)
    assert [i.image.size for i in items] == [(64, 64), (64, 64)]
    assert items[0].infotext == {}


@pytest.mark.parametrize("fill", [0, 2])
def test_latent_upscale_resize_mode_with_a_mask(pipe, engine, store, fill):
    (item,) = render(pipe, engine, store, mode="img2img", init_images=["init/wide.png"], mask="mask/left.png",
                     resize_mode=3, inpainting_fill=fill, denoising_strength=0.5)
    assert item.image.size == (64, 64)


@pytest.mark.parametrize("overrides", [
    {},  # txt2img
    {"mode": "img2img", "init_images": ["init/wide.png"], "denoising_strength": 0.5},
    {"mode": "img2img", "init_images": ["init/wide.png"], "mask": "mask/left.png", "denoising_strength": 0.5},
    {"mode": "img2img", "init_images": ["init/wide.png"], "resize_mode": 3, "denoising_strength": 0.5},
    {"enable_hr": True, "hr_resize_x": 90, "hr_resize_y": 70, "denoising_strength": 0.5, "hr_second_pass_steps": 1},
])
def test_sizes_not_multiple_of_8_come_out_floored_to_8_as_in_the_webui(pipe, engine, store, overrides):
    """The WebUI's latent is size // 8 and is never resized back: 70x60 renders 64x56; hires fix to 90x70 upscales to
    90x77 to cover it, whose latent (11x9) crops nothing: 88x72."""
    (item,) = render(pipe, engine, store, width=70, height=60, **overrides)
    assert item.image.size == ((88, 72) if overrides.get("enable_hr") else (64, 56))


def test_img2img_batch_image_k_matches_a_single_job_when_invariant(pipe, engine, store):
    batch = render(pipe, engine, store, mode="img2img", init_images=["init/a.png"], denoising_strength=0.5,
                   batch_size=2, limits=BatchLimits(invariant=True))
    (single,) = render(pipe, engine, store, mode="img2img", init_images=["init/a.png"], denoising_strength=0.5,
                       seed=1235)
    assert np.array_equal(pixels(batch[1].image), pixels(single.image))


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpainting_keeps_the_unmasked_half(pipe, engine, store, fill):
    (item,) = render(pipe, engine, store, mode="img2img", init_images=["init/a.png"], mask="mask/left.png",
                     mask_blur=0, inpainting_fill=fill, denoising_strength=0.75)
    init = pixels(Image.open(io.BytesIO(store["init/a.png"])))
    out = pixels(item.image)
    assert item.image.size == (64, 64)
    assert np.array_equal(out[:, 40:], init[:, 40:])
    assert not np.array_equal(out[:, :24], init[:, :24])
    expected = {0: "fill", 2: "latent noise", 3: "latent nothing"}.get(fill)
    assert item.infotext.get("Masked content") == expected


def test_inverted_mask_regenerates_the_other_half(pipe, engine, store):
    (item,) = render(pipe, engine, store, mode="img2img", init_images=["init/a.png"], mask="mask/left.png",
                     mask_blur=4, inpainting_mask_invert=1, denoising_strength=0.75)
    init, out = pixels(Image.open(io.BytesIO(store["init/a.png"]))), pixels(item.image)
    assert np.array_equal(out[:, :20], init[:, :20])
    assert not np.array_equal(out[:, 44:], init[:, 44:])
    assert item.infotext["Mask mode"] == "Inpaint not masked" and item.infotext["Mask blur"] == 4


def test_inpaint_only_masked_crops_and_pastes_back_at_full_size(pipe, engine, store):
    (item,) = render(pipe, engine, store, mode="img2img", init_images=["init/big.png"], mask="mask/centre.png",
                     mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=8, denoising_strength=0.75)
    init, out = pixels(Image.open(io.BytesIO(store["init/big.png"]))), pixels(item.image)
    assert item.image.size == (96, 96)  # the init image's size, not width x height
    assert np.array_equal(out[:30], init[:30]) and np.array_equal(out[:, 60:], init[:, 60:])
    assert not np.array_equal(out[40:56, 40:56], init[40:56, 40:56])
    assert item.infotext["Inpaint area"] == "Only masked" and item.infotext["Masked area padding"] == 8


def test_img2img_input_errors_are_user_errors(pipe, engine, store):
    with pytest.raises(FieldError, match="init_images"):
        render(pipe, engine, store, mode="img2img", init_images=[])
    with pytest.raises(FieldError, match="no uploaded image"):
        render(pipe, engine, store, mode="img2img", init_images=["init/missing.png"])
    with pytest.raises(FieldError, match="not a readable image"):
        render(pipe, engine, {**store, "bad.png": b"not an image"}, mode="img2img", init_images=["bad.png"])


# -- hires fix --------------------------------------------------------------------------------------

@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)",
                                      "Lanczos", "Nearest", "None"])
def test_hires_fix_output_is_hr_scale_times_the_size(pipe, engine, upscaler):
    (item,) = render(pipe, engine, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, denoising_strength=0.5,
                     hr_second_pass_steps=2, hr_prompt="a lighthouse at night", hr_sampler_name="Euler")
    assert item.image.size == (96, 96)


def test_hires_resize_to_another_aspect_ratio_crops_the_latent(pipe, engine):
    (item,) = render(pipe, engine, enable_hr=True, hr_resize_x=128, hr_resize_y=96, hr_upscaler="Latent",
                     denoising_strength=0.5, hr_second_pass_steps=1)
    assert item.image.size == (128, 96)


def test_an_upscaler_name_without_its_file_is_refused_with_a_clear_error(pipe, engine):
    with pytest.raises(FieldError, match="names no installed upscaler"):
        render(pipe, engine, enable_hr=True, hr_upscaler="4x-UltraSharp.pth", denoising_strength=0.5)


# -- VAE, embeddings, malformed prompts ----------------------------------------------------------------

def test_a_vae_file_is_used_for_its_job_only(pipe, engine):
    own_weights = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    (before,) = render(pipe, engine, sampler_name="Euler")
    (swapped,) = render(pipe, engine, sampler_name="Euler", vae="other.vae.safetensors")
    (diffusers_layout,) = render(pipe, engine, sampler_name="Euler", vae="other-diffusers")
    (after,) = render(pipe, engine, sampler_name="Euler", vae="None")
    assert not np.array_equal(pixels(before.image), pixels(swapped.image))
    assert np.array_equal(pixels(swapped.image), pixels(diffusers_layout.image))
    assert np.array_equal(pixels(before.image), pixels(after.image))
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in own_weights.items())
    assert swapped.infotext["VAE"] == "other.vae.safetensors" and len(swapped.infotext["VAE hash"]) == 10
    assert "VAE" not in after.infotext
    with pytest.raises(FieldError, match="unknown vae"):
        render(pipe, engine, vae="nope.safetensors")


def test_embeddings_are_used_when_named(pipe, engine, tmp_path):
    (named,) = render(pipe, engine, prompt="a lighthouse, glowstyle", sampler_name="Euler")
    (unknown,) = render(pipe, GenerationEngine(tmp_path), prompt="a lighthouse, glowstyle", sampler_name="Euler")
    assert not np.array_equal(pixels(named.image), pixels(unknown.image))
    assert named.infotext["TI hashes"].startswith("glowstyle: ") and "TI hashes" not in unknown.infotext


@pytest.mark.parametrize("prompt", ["(a:1.2.3) [b:c: <lora:x:abc>", "[a|", "a AND AND :x", "\\", ""])
def test_malformed_prompt_syntax_still_renders(pipe, engine, prompt):
    (item,) = render(pipe, engine, prompt=prompt, negative_prompt=prompt, steps=2)
    assert item.image.size == (64, 64)


# -- infotext and output formats ----------------------------------------------------------------------

def test_infotext_carries_the_webui_keys():
    job = spec(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=10, denoising_strength=0.45,
               clip_skip=2, eta_noise_seed_delta=31337, subseed_strength=0.2, seed_resize_from_w=512,
               seed_resize_from_h=512, scheduler="Karras", sampler_name="DPM2 a", hr_prompt="night")
    text = infotext_for(job, 1234, "demo", "0123456789", subseed=99, extra={"VAE": "x.safetensors"})
    parsed = parse_infotext(text)
    assert text.splitlines()[-1].startswith("Steps: 3, Sampler: DPM2 a, Schedule type: Karras, CFG scale: 7.0")
    for key, value in {"Clip skip": "2", "ENSD": "31337", "Variation seed": "99", "Variation seed strength": "0.2",
                       "Seed resize from-1": "512", "Denoising strength": "0.45", "Hires upscale": "2.0",
                       "Hires steps": "10", "Hires upscaler": "Latent", "Hires prompt": "night", "RNG": "CPU",
                       "VAE": "x.safetensors"}.items():
        assert parsed[key] == value, key
    plain = parse_infotext(infotext_for(spec(sampler_name="Euler", eta_noise_seed_delta=31337),
                                        1234, "demo", "0123456789"))
    assert "ENSD" not in plain and "Denoising strength" not in plain and plain["Clip skip"] == "1"


@pytest.mark.parametrize("output_format", ["jpeg", "webp", "png"])
def test_outputs_carry_the_infotext(output_format):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    text = "a café, (stormy:1.2)\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, Seed: 1, Size: 64x64"
    data = encode_image(image, text, output_format)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.format == {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[output_format]
        if output_format == "png":
            assert reopened.info["parameters"] == text
            return
    assert read_exif_infotext(data) == text
    assert parse_infotext(read_exif_infotext(data))["Seed"] == "1"
