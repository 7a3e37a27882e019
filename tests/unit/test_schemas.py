"""From a WebUI-style request to the immutable params a worker renders from (no servers needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from api.submission.params import plan_job, request_fields_from_infotext
from shared.errors import FieldError
from shared.jobs.schemas import MAX_SEED, Txt2ImgRequest, hires_target_size, resolve_params
from shared.settings import LimitSettings, ModelSettings, Settings
from tests.fake_files import as_safetensors, write_model_file

PARAM_KEYS = {
    "mode", "prompt", "negative_prompt", "styles", "steps", "cfg_scale", "sampler_name", "scheduler", "seed",
    "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "width", "height", "batch_size",
    "n_iter", "model", "vae", "clip_skip", "eta_noise_seed_delta", "denoising_strength", "init_images", "mask",
    "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "resize_mode", "enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps",
    "hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler", "output_format", "loras", "vae_hash",
    "batch_invariant", "controlnet", "restore_faces", "hr_upscaler_file", "upscaler_tile", "upscaler_tile_overlap",
    "prompt_builder", "hypernetworks",
}
CHECKPOINT_BYTES = b"not really a checkpoint, but hashed like one"
CHECKPOINT_HASH = hashlib.sha256(as_safetensors(CHECKPOINT_BYTES)).hexdigest()[:10]

# Written by the WebUI 1.6 (legacy sampler name, Clip skip, ENSD, hires fix).
WEBUI_INFOTEXT = (
    "masterpiece, 1girl, (silver hair:1.2), looking at viewer\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1363903108, Size: 512x768, "
    f"Model hash: {CHECKPOINT_HASH}, Model: anything-v5, Clip skip: 2, ENSD: 31337, Denoising strength: 0.45, "
    "Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest-exact), Version: v1.6.0"
)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for rel, data in {
        "Stable-diffusion/demo.safetensors": CHECKPOINT_BYTES,
        "Stable-diffusion/anime/anything-v5.safetensors": b"another",
        "Stable-diffusion/pickled.ckpt": b"x",
        "VAE/kl-f8-anime.safetensors": b"vae",
        "VAE/old-vae.pt": b"vae",
        "ESRGAN/4x-UltraSharp.safetensors": b"esrgan",
        "ESRGAN/4x-Old.pth": b"esrgan",
    }.items():
        write_model_file(tmp_path / rel, data)
    return tmp_path


@pytest.fixture
def settings(models: Path) -> Settings:
    return Settings(models=ModelSettings(models_dir=models, default_model="demo"),
                    limits=LimitSettings(max_pixels=1024 * 1024, max_side=2048))


def plan(settings: Settings, **body: object) -> dict:
    """The dict the job row stores."""
    return plan_job(Txt2ImgRequest(**body), settings).spec.to_stored()


def error(settings: Settings, **body: object) -> FieldError:
    with pytest.raises(FieldError) as info:
        plan(settings, **body)
    return info.value


# --- the params contract ---------------------------------------------------------------------------

def test_defaults_fill_every_key(settings: Settings) -> None:
    params = plan(settings, prompt="a cat")
    assert set(params) == PARAM_KEYS | {"version"}
    assert params | {"seed": 0, "subseed": 0} == {
        "version": 1, "mode": "txt2img", "prompt": "a cat", "negative_prompt": "", "styles": [], "steps": 20,
        "cfg_scale": 7.0,
        "sampler_name": "Euler", "scheduler": "Automatic", "seed": 0, "subseed": 0, "subseed_strength": 0.0,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "width": 512, "height": 512, "batch_size": 1,
        "n_iter": 1, "model": "demo", "vae": None, "clip_skip": 1, "eta_noise_seed_delta": 0,
        "denoising_strength": 0.7, "init_images": [], "mask": None, "mask_blur": 4, "inpainting_fill": 1,
        "inpaint_full_res": False, "inpaint_full_res_padding": 32, "inpainting_mask_invert": 0, "resize_mode": 0,
        "enable_hr": False, "hr_scale": 2.0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0, "hr_prompt": "", "hr_negative_prompt": "", "hr_sampler_name": None,
        "hr_scheduler": None, "output_format": "png", "loras": [], "vae_hash": None, "batch_invariant": False,
        "controlnet": [], "restore_faces": False, "hr_upscaler_file": None, "upscaler_tile": 192,
        "upscaler_tile_overlap": 8, "prompt_builder": None, "hypernetworks": [],
    }


def test_random_seeds_are_recorded_and_explicit_ones_kept(settings: Settings) -> None:
    params = plan(settings)
    assert 0 <= params["seed"] < MAX_SEED and 0 <= params["subseed"] < MAX_SEED
    assert plan(settings, seed=7, subseed=9, subseed_strength=0.3)["subseed"] == 9


def test_resolve_params_still_works_without_settings() -> None:
    params = resolve_params(Txt2ImgRequest(prompt="orphan", width=64, height=64, steps=2, seed=3), "demo-tiny")
    # Without settings there is no models folder: nothing resolves a model upscaler's file, its tiles or hypernetworks.
    assert set(params) == PARAM_KEYS - {"hr_upscaler_file", "upscaler_tile", "upscaler_tile_overlap", "hypernetworks"}
    assert params["seed"] == 3 and params["model"] == "demo-tiny"


def test_empty_init_images_mean_txt2img(settings: Settings) -> None:
    assert plan(settings, init_images=[])["mode"] == "txt2img"


def test_img2img_is_implied_by_init_images(settings: Settings) -> None:
    job = plan_job(Txt2ImgRequest(init_images=["upload:" + "0" * 32]), settings)
    spec = job.with_inputs(["inputs/x/init_0.png"], "inputs/x/mask.png")
    assert spec.mode == "img2img" and spec.denoising_strength == 0.75
    assert spec.init_images == ("inputs/x/init_0.png",) and spec.mask == "inputs/x/mask.png"
    assert spec.to_stored()["init_images"] == ["inputs/x/init_0.png"] and job.spec.init_images == ()


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"mode": "img2img"}, ("body", "init_images"), "at least one init image"),
    ({"mode": "txt2img", "init_images": ["x"]}, ("body", "init_images"), "for img2img"),
    ({"mask": "x"}, ("body", "mask"), "needs init_images"),
    ({"init_images": ["x"], "enable_hr": True}, ("body", "enable_hr"), "txt2img option"),
    ({"init_images": ["x"] * 9}, ("body", "init_images"), "at most 8"),
])
def test_mode_contradictions_name_the_field(settings: Settings, body: dict, field: tuple, message: str) -> None:
    exc = error(settings, **body)
    assert exc.field == field and message in exc.message


# --- samplers ---------------------------------------------------------------------------------------

def test_legacy_sampler_names_split_for_both_passes(settings: Settings) -> None:
    params = plan(settings, sampler_name="DPM++ 2M Karras", hr_sampler_name="DPM++ SDE Karras")
    assert (params["sampler_name"], params["scheduler"]) == ("DPM++ 2M", "Karras")
    assert (params["hr_sampler_name"], params["hr_scheduler"]) == ("DPM++ SDE", "Karras")


def test_hires_sampler_inherits_the_first_pass_schedule(settings: Settings) -> None:
    params = plan(settings, sampler_name="Euler", scheduler="Karras", hr_sampler_name="k_dpmpp_2m")
    assert (params["hr_sampler_name"], params["hr_scheduler"]) == ("DPM++ 2M", None)
    assert plan(settings, hr_scheduler="exponential")["hr_scheduler"] == "Exponential"


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"hr_sampler_name": "Euler z"}, "hr_sampler_name", "valid samplers: DPM++ 2M"),
    ({"hr_scheduler": "Sideways"}, "hr_scheduler", "valid schedule types"),
    ({"hr_sampler_name": "DDIM", "hr_scheduler": "Karras"}, "hr_scheduler", "supports the schedule types"),
    ({"scheduler": "Karras", "hr_sampler_name": "DDIM"}, "hr_sampler_name", "set hr_scheduler"),
])
def test_hires_sampler_errors(settings: Settings, body: dict, field: str, message: str) -> None:
    exc = error(settings, **body)
    assert exc.field == ("body", field) and message in exc.message


# --- hires fix ----------------------------------------------------------------------------------------

def test_hires_target_size_matches_the_webui() -> None:
    assert hires_target_size(512, 768, 1.5, 0, 0) == (768, 1152, 768, 1152)
    assert hires_target_size(512, 768, 2.0, 1024, 0) == (1024, 1536, 1024, 1536)
    assert hires_target_size(512, 768, 2.0, 0, 1024) == (682, 1024, 682, 1024)
    # Both given: upscale to cover, then crop to the target.
    assert hires_target_size(512, 768, 2.0, 1000, 1000) == (1000, 1500, 1000, 1000)
    assert hires_target_size(768, 512, 2.0, 1000, 1000) == (1500, 1000, 1000, 1000)


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"hr_scale": 2.5}, "hr_scale", "exceeds the limit"),
    ({"hr_resize_x": 4096}, "hr_resize_x", "at most 2048"),
    ({"hr_second_pass_steps": 151}, "hr_second_pass_steps", "between 0 and 150"),
])
def test_hires_limits(settings: Settings, body: dict, field: str, message: str) -> None:
    exc = error(settings, enable_hr=True, **body)
    assert exc.field == ("body", field) and message in exc.message


def test_hires_limits_only_apply_when_enabled(settings: Settings) -> None:
    assert plan(settings, hr_scale=2.5)["enable_hr"] is False


def test_denoising_must_be_a_fraction(settings: Settings) -> None:
    with pytest.raises(ValueError):
        Txt2ImgRequest(denoising_strength=1.5)


@pytest.mark.parametrize(("requested", "stored"), [
    ("latent (NEAREST-exact)", "Latent (nearest-exact)"), ("Lanczos", "Lanczos"), ("None", "None"),
])
def test_hr_upscaler_names(settings: Settings, requested: str, stored: str) -> None:
    assert plan(settings, enable_hr=True, hr_upscaler=requested)["hr_upscaler"] == stored


@pytest.mark.parametrize(("name", "message"), [
    ("4x-Old", "not a readable torch file"), ("../VAE/kl-f8-anime", "unknown upscaler"),
    ("/etc/passwd", "unknown upscaler"), ("SwinIR", "available: None, Lanczos, Nearest, Latent"),
])
def test_hr_upscaler_refusals(settings: Settings, name: str, message: str) -> None:
    exc = error(settings, hr_upscaler=name)
    assert exc.field == ("body", "hr_upscaler") and message in exc.message


@pytest.mark.parametrize("name", ["4x-UltraSharp", "4x-UltraSharp.safetensors", "ESRGAN/4x-UltraSharp.safetensors"])
def test_a_model_upscaler_is_stored_by_name_with_its_file_and_tiles(settings: Settings, name: str) -> None:
    stored = plan(settings, enable_hr=True, hr_upscaler=name)
    assert stored["hr_upscaler"] == "4x-UltraSharp"
    assert stored["hr_upscaler_file"] == "ESRGAN/4x-UltraSharp.safetensors"
    assert (stored["upscaler_tile"], stored["upscaler_tile_overlap"]) == (192, 8)


def test_sizes_need_not_be_multiples_of_8(settings: Settings) -> None:
    """The WebUI takes any size (its latent is size // 8); the hires target too."""
    stored = plan(settings, width=100, height=76, enable_hr=True, hr_scale=1.3)
    assert (stored["width"], stored["height"], stored["hr_scale"]) == (100, 76, 1.3)


# --- VAE ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("requested", "stored"), [
    (None, None), ("Automatic", None), ("None", None), ("kl-f8-anime", "kl-f8-anime.safetensors"),
    ("kl-f8-anime.safetensors", "kl-f8-anime.safetensors"),
])
def test_vae_names(settings: Settings, requested: str | None, stored: str | None) -> None:
    assert plan(settings, vae=requested)["vae"] == stored


@pytest.mark.parametrize(("name", "message"), [
    ("old-vae.pt", "pickles"), ("../Stable-diffusion/demo", "not a name inside models/VAE/"),
    ("missing", "available in models/VAE/: kl-f8-anime.safetensors"),
])
def test_vae_refusals(settings: Settings, name: str, message: str) -> None:
    exc = error(settings, vae=name)
    assert exc.field == ("body", "vae") and message in exc.message


def test_vae_symlink_out_of_the_folder_is_refused(settings: Settings, models: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside") / "evil.safetensors"
    write_model_file(outside, b"x")
    (models / "VAE" / "evil.safetensors").symlink_to(outside)
    assert "outside" in error(settings, vae="evil").message


# --- override_settings ----------------------------------------------------------------------------------

def test_override_settings_set_fields(settings: Settings) -> None:
    params = plan(settings, override_settings={
        "sd_model_checkpoint": "anything-v5.safetensors [0123456789]", "sd_vae": "kl-f8-anime",
        "CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337,
    })
    assert (params["model"], params["vae"]) == ("anime/anything-v5", "kl-f8-anime.safetensors")
    assert (params["clip_skip"], params["eta_noise_seed_delta"]) == (2, 31337)


def test_override_checkpoint_by_hash(settings: Settings) -> None:
    assert plan(settings, override_settings={"sd_model_checkpoint": CHECKPOINT_HASH})["model"] == "demo"


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"override_settings": {"sd_model_refiner": "x"}}, ("body", "override_settings", "sd_model_refiner"),
     "accepts: sd_model_checkpoint"),
    ({"clip_skip": 2, "override_settings": {"CLIP_stop_at_last_layers": 3}},
     ("body", "override_settings", "CLIP_stop_at_last_layers"), "conflicts with clip_skip=2"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}},
     ("body", "override_settings", "CLIP_stop_at_last_layers"), "valid integer"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 13}},
     ("body", "override_settings", "CLIP_stop_at_last_layers"), "less than or equal to 12"),
    ({"override_settings": {"sd_vae": "../x"}}, ("body", "override_settings", "sd_vae"), "not a name inside"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}},
     ("body", "override_settings", "sd_model_checkpoint"), "unknown model"),
])
def test_override_settings_errors_name_the_key(settings: Settings, body: dict, field: tuple, message: str) -> None:
    exc = error(settings, **body)
    assert exc.field == field and message in exc.message, exc.message


def test_same_value_in_field_and_override_is_fine(settings: Settings) -> None:
    assert plan(settings, clip_skip=2, override_settings={"CLIP_stop_at_last_layers": 2})["clip_skip"] == 2


# --- infotext -------------------------------------------------------------------------------------------

def test_webui_infotext_fills_the_request(settings: Settings) -> None:
    params = plan(settings, infotext=WEBUI_INFOTEXT)
    assert params["prompt"] == "masterpiece, 1girl, (silver hair:1.2), looking at viewer"
    assert params["negative_prompt"] == "lowres, bad anatomy"
    assert (params["steps"], params["cfg_scale"], params["seed"]) == (28, 7.5, 1363903108)
    assert (params["sampler_name"], params["scheduler"]) == ("DPM++ 2M", "Karras")
    assert (params["width"], params["height"]) == (512, 768)
    assert (params["clip_skip"], params["eta_noise_seed_delta"]) == (2, 31337)
    assert params["model"] == "anime/anything-v5"  # by the name the WebUI writes, without folder
    assert params["enable_hr"] is True
    assert (params["hr_scale"], params["hr_second_pass_steps"]) == (1.5, 12)
    assert (params["hr_upscaler"], params["denoising_strength"]) == ("Latent (nearest-exact)", 0.45)
    assert (params["hr_sampler_name"], params["hr_scheduler"]) == (None, None)


def test_explicit_fields_and_overrides_win_over_the_infotext(settings: Settings) -> None:
    params = plan(settings, infotext=WEBUI_INFOTEXT, steps=10, seed=-1, model="demo",
                  override_settings={"CLIP_stop_at_last_layers": 1})
    assert params["steps"] == 10 and params["seed"] != 1363903108
    assert params["model"] == "demo" and params["clip_skip"] == 1
    assert params["cfg_scale"] == 7.5  # still from the infotext


def test_infotext_model_by_hash_when_the_name_is_unknown(settings: Settings) -> None:
    text = WEBUI_INFOTEXT.replace("Model: anything-v5", "Model: renamed-on-civitai")
    assert plan(settings, infotext=text)["model"] == "demo"


@pytest.mark.parametrize(("old", "new", "message"), [
    ("Model: anything-v5", "Model: elsewhere", "model 'elsewhere'"),
    ("Steps: 28", "Steps: 500", "infotext 'Steps': steps must be between 1 and 150"),
    ("Steps: 28", "Steps: many", "infotext 'Steps': Input should be a valid integer"),
    ("Sampler: DPM++ 2M Karras", "Sampler: Restart", "infotext 'Sampler': unknown sampler 'Restart'"),
    ("Size: 512x768", "Size: 4096x4096", "infotext 'Size-1'"),
    ("Clip skip: 2", "Clip skip: 2, VAE: missing.safetensors", "infotext 'VAE': unknown VAE"),
])
def test_bad_infotext_values_name_the_infotext(settings: Settings, old: str, new: str, message: str) -> None:
    if old.startswith("Model:"):
        new_text = WEBUI_INFOTEXT.replace(old, new).replace(CHECKPOINT_HASH, "abcdefabcd")
    else:
        new_text = WEBUI_INFOTEXT.replace(old, new)
    exc = error(settings, infotext=new_text)
    assert exc.field == ("body", "infotext") and message in exc.message, exc.message
    assert "set model to one of" in exc.message or "in the request to override the infotext" in exc.message


def test_img2img_infotext_fills_inpainting_fields(settings: Settings) -> None:
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.6, "
            "Mask blur: 8, Inpaint area: Only masked, Masked area padding: 48, Masked content: latent noise, "
            "Mask mode: Inpaint not masked")
    params = plan_job(Txt2ImgRequest(infotext=text, init_images=["x"]), settings).spec.to_stored()
    assert (params["mode"], params["denoising_strength"], params["mask_blur"]) == ("img2img", 0.6, 8)
    assert (params["inpaint_full_res"], params["inpaint_full_res_padding"]) == (True, 48)
    assert (params["inpainting_fill"], params["inpainting_mask_invert"]) == (2, 1)
    assert params["enable_hr"] is False


def test_an_img2img_infotext_does_not_turn_hires_on_in_txt2img(settings: Settings) -> None:
    text = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.6"
    params = plan(settings, infotext=text)
    assert params["enable_hr"] is False and params["denoising_strength"] == 0.6


def test_infotext_hires_sampler_and_resize(settings: Settings) -> None:
    text = ("a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.5, "
            "Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires resize: 1024x1024, Hires upscaler: Lanczos")
    params = plan(settings, infotext=text)
    assert (params["hr_sampler_name"], params["hr_scheduler"]) == ("DPM++ 2M", "Karras")
    assert (params["enable_hr"], params["hr_resize_x"], params["hr_resize_y"]) == (True, 1024, 1024)


def test_request_fields_from_infotext_map_like_the_webui_paste() -> None:
    parsed = {"Steps": "20", "Size-1": "512", "Size-2": "768", "Hires sampler": "Use same sampler",
              "Masked content": "fill"}
    assert request_fields_from_infotext(parsed, "txt2img") == {
        "steps": ("20", "Steps"), "width": ("512", "Size-1"), "height": ("768", "Size-2"),
        "hr_sampler_name": (None, "Hires sampler"),
    }
    assert request_fields_from_infotext(parsed, "img2img")["inpainting_fill"] == (0, "Masked content")


# --- styles -----------------------------------------------------------------------------------------

def test_styles_are_applied_to_prompts_and_recorded(settings: Settings) -> None:
    params = plan(settings, prompt="a knight", negative_prompt="blurry", styles=["Common negative"],
                  hr_prompt="a knight, detailed")
    assert params["prompt"] == "(best quality), (masterpiece), (high resolution), a knight"
    assert params["negative_prompt"].startswith("blurry, lowres, ((bad anatomy)), ((bad hands)), text")
    assert params["hr_prompt"] == "(best quality), (masterpiece), (high resolution), a knight, detailed"
    assert params["hr_negative_prompt"] == ""  # empty: the (styled) negative prompt
    assert params["styles"] == ["Common negative"]


def test_unknown_style_lists_the_known_ones(settings: Settings) -> None:
    exc = error(settings, styles=["Common negative", "Cyberpunk"])
    assert exc.field == ("body", "styles", 1)
    assert "Portrait quality" in exc.message and "Background wallpaper" in exc.message


def test_a_pickle_renamed_safetensors_is_refused_at_listing_and_at_submit(settings: Settings, models: Path) -> None:
    from shared.models.files import list_model_files
    from shared.models.registry import scan_checkpoints

    pickle_bytes = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
    (models / "Stable-diffusion" / "renamed.safetensors").write_bytes(pickle_bytes)
    (models / "Lora" / "renamed.safetensors").parent.mkdir(exist_ok=True)
    (models / "Lora" / "renamed.safetensors").write_bytes(pickle_bytes)
    (listed,) = [c for c in scan_checkpoints(models) if c.name == "renamed"]
    assert not listed.loadable and "not a valid safetensors file" in (listed.refused_reason or "")
    assert dict(list_model_files(models, "Lora"))["renamed.safetensors"] is not None
    refused = error(settings, model="renamed")
    assert refused.field == ("body", "model") and "renamed pickle is never opened" in refused.message
    lora = error(settings, prompt="a cat <lora:renamed:0.5>")
    assert lora.field == ("body", "prompt") and "refused" in lora.message


def test_restore_faces_needs_gfpgan_and_its_helpers_installed(settings: Settings, models: Path) -> None:
    exc = error(settings, restore_faces=True)
    assert exc.field == ("body", "restore_faces") and "GFPGAN" in exc.message
    for name in ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"):
        (models / "GFPGAN").mkdir(exist_ok=True)
        (models / "GFPGAN" / name).write_bytes(b"weights")
    assert plan(settings, restore_faces=True)["restore_faces"] is True


def test_an_infotext_with_a_size_not_multiple_of_8_makes_that_job(settings: Settings) -> None:
    infotext = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 100x76, Model: demo"
    stored = plan(settings, infotext=infotext)
    assert (stored["width"], stored["height"]) == (100, 76)
