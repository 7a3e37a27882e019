"""The render contract: stored rows parse (old shapes too), the spec is frozen and versioned, batch keys."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.jobs.contract import RenderSpec, UpscaleSpec, parse_job_spec
from shared.jobs.schemas import Txt2ImgRequest, resolve_params

# The first shape rows ever had (before LoRAs, hires fix, img2img, variation seeds and styles).
OLDEST_ROW: dict[str, Any] = {
    "mode": "txt2img", "prompt": "a lighthouse <lora:alpha:0.5>", "negative_prompt": "blurry", "steps": 20,
    "cfg_scale": 7.0, "sampler_name": "Euler a", "scheduler": "Automatic", "seed": 1234, "width": 512,
    "height": 512, "batch_size": 1, "n_iter": 1, "model": "demo",
}


def stored(**fields: Any) -> dict[str, Any]:
    """A row as today's API stores it: resolve_params plus the LoRA list, ControlNet units, hypernetworks and hires
    fix's model upscaler (its file and tiles) the API resolves."""
    units = fields.pop("controlnet", [])
    hypernetworks = fields.pop("hypernetworks", [])
    upscaler = {"hr_upscaler_file": fields.pop("hr_upscaler_file", None), "upscaler_tile": 192,
                "upscaler_tile_overlap": 8}
    params = resolve_params(Txt2ImgRequest(seed=7, subseed=9, width=64, height=64, steps=4, **fields), "demo")
    params["loras"] = [{"name": "alpha", "weight": 0.5, "file": "alpha.safetensors", "hash": "0123456789ab"}]
    params["controlnet"] = units
    params["hypernetworks"] = hypernetworks
    params.update(upscaler)
    return params


def spec(**changes: Any) -> RenderSpec:
    return RenderSpec.from_stored({**stored(), **changes})


def test_the_contract_covers_every_key_the_api_resolves() -> None:
    assert set(RenderSpec.model_fields) == set(stored()) | {"version"}


@pytest.mark.parametrize("fields", [
    {},
    {"enable_hr": True, "hr_scale": 1.5, "hr_sampler_name": "DPM++ 2M", "hr_prompt": "night"},
    {"init_images": ["x"], "mask": "m", "inpainting_fill": 2, "resize_mode": 3, "output_format": "webp"},
    {"vae": "other.safetensors", "clip_skip": 2, "styles": [], "subseed_strength": 0.3},
    {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+", "hr_upscaler_file": "RealESRGAN/RealESRGAN_x4plus.pth"},
    {"controlnet": [{"module": "canny", "model": "cn", "model_title": "cn [0123abcd]",
                     "model_location": "models/ControlNet/cn.safetensors", "weight": 0.8, "image": "k",
                     "mask": None, "resize_mode": "Resize and Fill", "processor_res": 512, "threshold_a": 100,
                     "threshold_b": 200.0, "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
                     "control_mode": "My prompt is more important", "hr_option": "Both", "low_vram": False}]},
])
def test_stored_dict_round_trips(fields: dict[str, Any]) -> None:
    row = stored(**fields)
    parsed = RenderSpec.from_stored(row)
    assert parsed.to_stored() == {"version": 1, **row}
    assert RenderSpec.from_stored(parsed.to_stored()) == parsed


def test_an_old_row_parses_with_the_defaults_the_worker_always_gave() -> None:
    old = RenderSpec.from_stored(OLDEST_ROW)
    assert old.version == 1 and old.subseed == -1 and old.subseed_strength == 0.0 and old.clip_skip == 1
    assert old.denoising_strength == 0.7 and not old.hires_enabled and old.init_images == () and old.mask is None
    assert (old.hr_upscaler, old.output_format, old.vae, old.inpainting_fill) == ("Latent", "png", None, 1)
    # Rows from before "loras" existed: the prompt's tags, by file name, as the worker read them then.
    assert [(lora.name, lora.weight, lora.file, lora.hash) for lora in old.loras] == [
        ("alpha", 0.5, "alpha.safetensors", None)]
    img2img = RenderSpec.from_stored({**OLDEST_ROW, "mode": "img2img", "init_images": ["k"]})
    assert img2img.denoising_strength == 0.75
    assert RenderSpec.from_stored({**OLDEST_ROW, "prompt": "<lora:bad:x>"}).loras == ()


def test_a_none_in_an_old_row_takes_the_fields_default() -> None:
    old = RenderSpec.from_stored({**OLDEST_ROW, "subseed": None, "subseed_strength": None, "clip_skip": None,
                                  "eta_noise_seed_delta": None, "mask_blur": None, "vae": None})
    assert (old.subseed, old.subseed_strength, old.clip_skip, old.eta_noise_seed_delta, old.mask_blur, old.vae) == (
        -1, 0.0, 1, 0, 4, None)
    with pytest.raises(ValidationError):  # a required field stays required
        RenderSpec.from_stored({**OLDEST_ROW, "steps": None})


def test_json_numbers_coerce_to_the_field_types() -> None:
    parsed = spec(cfg_scale=7, hr_scale=2, steps=4.0)
    assert isinstance(parsed.cfg_scale, float) and isinstance(parsed.hr_scale, float) and parsed.steps == 4


def test_the_spec_is_frozen() -> None:
    parsed = spec()
    with pytest.raises(ValidationError):
        parsed.steps = 5  # type: ignore[misc]
    with pytest.raises(ValidationError):
        parsed.loras[0].weight = 2.0  # type: ignore[misc]
    assert hash(parsed.batch_key) == hash(spec().batch_key)


def test_unknown_versions_and_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="version 2 is not supported"):
        RenderSpec.from_stored({**stored(), "version": 2})
    with pytest.raises(ValidationError, match="extra"):
        RenderSpec.from_stored({**stored(), "refiner_checkpoint": "sdxl_refiner"})
    with pytest.raises(ValidationError, match="output_format"):
        RenderSpec.from_stored({**stored(), "output_format": "gif"})
    with pytest.raises(ValidationError, match="steps"):
        RenderSpec.from_stored({k: v for k, v in stored().items() if k != "steps"})


# -- batch key ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"prompt": "another prompt, with_an_embedding", "negative_prompt": "x"},
    {"seed": 99, "subseed": 3, "subseed_strength": 0.4, "eta_noise_seed_delta": 31337},
    {"cfg_scale": 4.0, "batch_size": 3, "n_iter": 2, "styles": ["s"], "output_format": "jpeg"},
    {"hr_prompt": "night", "hr_scale": 3.0, "denoising_strength": 0.2},  # hires settings unused without hires fix
    {"loras": [{"name": "shown as", "weight": 0.5, "file": "alpha.safetensors", "hash": "0123456789ab"}]},
])
def test_batch_key_ignores_what_is_per_image(changes: dict[str, Any]) -> None:
    assert spec(**changes).batch_key == spec().batch_key


@pytest.mark.parametrize("changes", [
    {"model": "other"},
    {"width": 128},
    {"height": 128},
    {"sampler_name": "Heun"},
    {"scheduler": "Karras"},
    {"steps": 5},
    {"mode": "img2img", "init_images": ["x"]},
    {"enable_hr": True},
    {"vae": "other.safetensors", "vae_hash": "abcdef0123"},
    {"clip_skip": 2},
    {"loras": []},
    {"loras": [{"name": "alpha", "weight": 0.6, "file": "alpha.safetensors", "hash": "0123456789ab"}]},
    {"loras": [{"name": "beta", "weight": 0.5, "file": "beta.safetensors", "hash": "ba9876543210"}]},
])
def test_batch_key_differs_for_what_the_batch_shares(changes: dict[str, Any]) -> None:
    assert spec(**changes).batch_key != spec().batch_key


def test_lora_order_is_part_of_the_key_and_invariant_jobs_have_none() -> None:
    a = {"name": "alpha", "weight": 1.0, "file": "alpha.safetensors", "hash": "0123456789ab"}
    b = {"name": "beta", "weight": 0.5, "file": "beta.safetensors", "hash": "ba9876543210"}
    assert spec(loras=[a, b]).batch_key != spec(loras=[b, a]).batch_key
    assert spec(batch_invariant=True).batch_key is None and spec(batch_invariant=True).batch_key_digest is None
    digest = spec().batch_key_digest
    assert digest is not None and len(digest) == 32 and digest == spec(seed=5, prompt="other").batch_key_digest
    assert digest != spec(steps=5).batch_key_digest


def test_batch_key_of_hires_and_img2img_jobs() -> None:
    hires = spec(enable_hr=True, hr_scale=2.0)
    assert spec(enable_hr=True, hr_scale=2.0, hr_prompt="night").batch_key == hires.batch_key
    for changes in ({"hr_scale": 1.5}, {"hr_upscaler": "Lanczos"}, {"hr_second_pass_steps": 2},
                    {"hr_sampler_name": "Heun"}, {"denoising_strength": 0.3}, {"hr_resize_x": 128}):
        assert spec(**{"enable_hr": True, "hr_scale": 2.0, **changes}).batch_key != hires.batch_key, changes
    # hr_second_pass_steps 0 means "as many as the first pass": the same plan as naming that count.
    assert spec(enable_hr=True, hr_second_pass_steps=4).batch_key == spec(enable_hr=True).batch_key
    img2img = spec(mode="img2img", init_images=["a"], denoising_strength=0.5)
    assert spec(mode="img2img", init_images=["b"], mask="m", denoising_strength=0.5).batch_key == img2img.batch_key
    assert spec(mode="img2img", init_images=["a"], denoising_strength=0.6).batch_key != img2img.batch_key



def test_controlnet_units_share_their_models_and_keep_images_and_weights_per_image() -> None:
    unit = {"module": "canny", "model": "cn", "model_title": "cn [0123abcd]",
            "model_location": "models/ControlNet/cn.safetensors", "image": "a"}
    base = spec(controlnet=[unit])
    assert base.batch_key != spec().batch_key  # a job without units is never batched with one that has them
    other_image = spec(controlnet=[{**unit, "image": "b", "weight": 0.3, "guidance_end": 0.5,
                                    "control_mode": "ControlNet is more important"}])
    assert other_image.batch_key == base.batch_key
    assert spec(controlnet=[{**unit, "model_location": "models/ControlNet/other.safetensors"}]).batch_key \
        != base.batch_key
    assert spec(controlnet=[unit, unit]).batch_key != base.batch_key


def test_a_model_upscaler_and_its_tiles_are_part_of_the_hires_batch_key() -> None:
    esrgan = spec(enable_hr=True, hr_upscaler="4x-a", hr_upscaler_file="ESRGAN/4x-a.safetensors")
    assert esrgan.batch_key != spec(enable_hr=True, hr_upscaler="4x-b", hr_upscaler_file="ESRGAN/4x-b.pth").batch_key
    assert esrgan.batch_key != esrgan.model_copy(update={"upscaler_tile": 0}).batch_key
    latent = spec(enable_hr=True)
    assert latent.batch_key == latent.model_copy(update={"upscaler_tile": 0}).batch_key  # unused without a model


def test_an_upscale_job_has_its_own_contract_and_is_never_batched() -> None:
    row = {"version": 1, "mode": "upscale", "images": ["inputs/x/extras_0.png"], "infotexts": [None],
           "upscaler_1": "R-ESRGAN 4x+", "upscaler_1_file": "RealESRGAN/RealESRGAN_x4plus.pth", "seed": -1}
    parsed = parse_job_spec(row)
    assert isinstance(parsed, UpscaleSpec) and parsed.image_count == 1 and parsed.batch_key is None
    assert parse_job_spec(parsed.to_stored()) == parsed
    assert isinstance(parse_job_spec(OLDEST_ROW), RenderSpec)
    with pytest.raises(ValidationError):
        parse_job_spec({**row, "prompt": "not an upscale field"})


def test_a_hypernetwork_joins_the_batch_key_and_leaves_other_keys_as_they_were() -> None:
    plain = RenderSpec.from_stored(stored())
    assert plain.hypernetworks == ()
    shaded = RenderSpec.from_stored(stored(hypernetworks=[{"name": "anime", "multiplier": 0.5, "file": "anime.pt"}]))
    assert shaded.batch_key != plain.batch_key
    assert shaded.batch_key is not None and plain.batch_key is not None
    assert shaded.batch_key[:len(plain.batch_key)] == plain.batch_key  # an extra part: old keys stay what they were
    stronger = RenderSpec.from_stored(stored(hypernetworks=[{"name": "anime", "multiplier": 1.0, "file": "anime.pt"}]))
    assert stronger.batch_key != shaded.batch_key
