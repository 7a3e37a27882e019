"""WebUI request bodies → farm requests, unsupported features, and the sdapi auth header parsing (no servers)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.sdapi.auth import credentials
from api.sdapi.requests import Img2ImgBody, Txt2ImgBody, to_farm_request, unsupported_features
from shared.errors import FieldError

WEBUIAPI_DEFAULTS = {  # what webuiapi.WebUIApi.txt2img sends when called with only a prompt
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "prompt": "a cat", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
    "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 20, "cfg_scale": 7.0, "width": 512,
    "height": 512, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "sampler_name": "Euler a",
    "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def test_webuiapi_payload_maps_to_a_plain_farm_request() -> None:
    body = Txt2ImgBody.model_validate({**WEBUIAPI_DEFAULTS, "some_future_field": 1})
    assert unsupported_features(body) == []
    req = to_farm_request(body, {})
    assert req.sampler_name == "Euler a" and req.scheduler == "automatic"
    assert req.seed_resize_from_w == -1 and req.denoising_strength is None  # no hires fix: no denoising
    assert req.steps == 20 and req.override_settings == {}
    assert req.restore_faces is False
    faces = to_farm_request(Txt2ImgBody.model_validate({**WEBUIAPI_DEFAULTS, "restore_faces": True}), {})
    assert faces.restore_faces is True  # GFPGAN, the farm's face restorer


def test_unset_fields_take_webui_defaults_and_key_options_below_infotext() -> None:
    body = Txt2ImgBody.model_validate({"prompt": "x", "infotext": "x\nSteps: 7, Sampler: Euler, Seed: 5, Clip skip: 2"})
    req = to_farm_request(body, {"clip_skip": 3, "eta_noise_seed_delta": 31337, "model": "demo-tiny"})
    fields = req.model_fields_set
    assert "steps" not in fields and "clip_skip" not in fields  # left to the infotext, which fills them later
    assert req.eta_noise_seed_delta == 31337 and req.model == "demo-tiny"
    plain = to_farm_request(Txt2ImgBody.model_validate({"prompt": "x"}), {"clip_skip": 3})
    assert plain.steps == 50 and plain.clip_skip == 3  # the WebUI API's default steps; the key's clip skip


def test_override_settings_beat_key_options() -> None:
    body = Txt2ImgBody.model_validate({"override_settings": {"CLIP_stop_at_last_layers": 2}})
    req = to_farm_request(body, {"clip_skip": 3})
    assert "clip_skip" not in req.model_fields_set and req.override_settings == {"CLIP_stop_at_last_layers": 2}


def test_sampler_index_is_used_when_sampler_name_is_missing() -> None:
    assert to_farm_request(Txt2ImgBody.model_validate({"sampler_index": "DDIM"}), {}).sampler_name == "DDIM"


def test_img2img_without_mask_drops_inpainting_fields_and_sets_mode() -> None:
    body = Img2ImgBody.model_validate({"init_images": ["abc"], "inpainting_fill": 0, "mask_blur": 4})
    req = to_farm_request(body, {})
    assert req.mode == "img2img" and "inpainting_fill" not in req.model_fields_set
    masked = to_farm_request(Img2ImgBody.model_validate({"init_images": ["abc"], "mask": "m"}), {})
    assert masked.inpainting_fill == 0 and masked.inpaint_full_res is True  # the WebUI API's defaults


@pytest.mark.parametrize("payload, loc", [
    ({"script_name": "x/y plot"}, ("body", "script_name")),
    ({"alwayson_scripts": {"Regional Prompter": {"args": [True]}}}, ("body", "alwayson_scripts", "Regional Prompter")),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "advanced_weighting": [1.0] * 13}]}}},
     ("body", "alwayson_scripts", "ControlNet", "args", 0, "advanced_weighting")),
    ({"hr_checkpoint_name": "other.safetensors"}, ("body", "hr_checkpoint_name")),
])
def test_missing_features_are_errors_naming_them(payload: dict, loc: tuple) -> None:
    with pytest.raises(FieldError) as caught:
        unsupported_features(Txt2ImgBody.model_validate(payload))
    assert caught.value.field == loc


def test_disabled_scripts_and_unsupported_knobs_become_warnings() -> None:
    body = Txt2ImgBody.model_validate({"alwayson_scripts": {"ADetailer": {"args": [False]}}, "eta": 0.5})
    warnings = unsupported_features(body)
    assert any("ADetailer" in w for w in warnings) and any("eta=0.5" in w for w in warnings)


def test_controlnet_args_become_the_farm_field_and_errors_name_the_args_entry() -> None:
    units = [False, {"enabled": False, "module": "canny"},
             {"enabled": True, "module": "canny", "model": "m [0123abcd]", "input_image": "abc", "guessmode": False,
              "control_mode": 1, "resize_mode": "Envelope (Outer Fit)"}]
    body = Txt2ImgBody.model_validate({"alwayson_scripts": {"controlnet": {"args": units}}})
    warnings = unsupported_features(body)
    assert any("unit 1 is off" in w for w in warnings) and any("guessmode ignored" in w for w in warnings)
    (unit,) = to_farm_request(body, {}).controlnet
    assert (unit.module, unit.image, unit.control_mode.value, unit.resize_mode.value) == (
        "canny", "abc", "My prompt is more important", "Resize and Fill")
    bad = Txt2ImgBody.model_validate({"alwayson_scripts": {"controlnet": {"args": [
        {"enabled": False}, {"enabled": True, "weight": 3}]}}})
    with pytest.raises(FieldError) as caught:
        to_farm_request(bad, {})
    assert caught.value.field == ("body", "alwayson_scripts", "controlnet", "args", 1, "weight")


def test_out_of_range_values_name_the_webui_field() -> None:
    # The WebUI body carries the farm's bounds, so the schema shows them and FastAPI's 422 names the field.
    with pytest.raises(ValidationError) as caught:
        Txt2ImgBody.model_validate({"cfg_scale": 99})
    assert caught.value.errors()[0]["loc"] == ("cfg_scale",)
    with pytest.raises(ValidationError):
        Img2ImgBody.model_validate({"prompt": "no init image"})


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_auth_headers() -> None:
    assert credentials("Bearer rf_abc") == ["rf_abc"]
    assert credentials(_basic("anyone", "rf_key")) == ["rf_key"]
    assert credentials(_basic("rf_key", "")) == ["rf_key"]
    assert credentials("Basic !!!") == [] and credentials("Digest x") == [] and credentials("") == []


def test_a_stored_checkpoint_that_was_removed_falls_back_to_the_default_and_says_so(tmp_path: Path) -> None:
    from api.sdapi.options import job_defaults
    from shared.settings import ModelSettings, Settings
    from tests.fake_files import write_model_file

    write_model_file(tmp_path / "Stable-diffusion" / "kept.safetensors", b"kept")
    settings = Settings(models=ModelSettings(models_dir=tmp_path))
    stored = {"sd_model_checkpoint": "gone", "sd_vae": "gone-vae", "CLIP_stop_at_last_layers": 2}
    defaults, warnings = job_defaults(stored, settings)
    assert defaults == {"clip_skip": 2}
    assert len(warnings) == 2 and "sd_model_checkpoint='gone'" in warnings[0] and "default" in warnings[0]
    assert job_defaults({"sd_model_checkpoint": "kept"}, settings) == ({"model": "kept"}, [])
