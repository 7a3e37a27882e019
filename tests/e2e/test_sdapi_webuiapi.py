"""The real ``webuiapi`` client against the farm (API + worker, tiny demo model, 64x64, 2 steps).

What a WebUI user's script does, unchanged, must render real jobs: txt2img, img2img with a mask,
model listing and switching (per key), sampler names, waiting for readiness.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import webuiapi
from PIL import Image

from shared.webui.infotext import parse_infotext
from tests.conftest import make_key
from tests.farm_harness import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("farm", ["local"], indirect=True)]
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def user_key(farm: Farm) -> str:
    return make_key(farm.env["DATABASE_URL"], "webuiapi-user")


@pytest.fixture
def api(farm: Farm, user_key: str) -> Iterator[webuiapi.WebUIApi]:
    client = webuiapi.WebUIApi(baseurl=f"{farm.base_url}/sdapi/v1", username="anyone", password=user_key)
    yield client
    client.session.close()


def _job(farm: Farm, key: str, job_id: str) -> dict:
    with farm.client(key) as c:
        resp = c.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_txt2img_with_lora_tag_negative_prompt_seed_and_sampler(farm: Farm, api: webuiapi.WebUIApi,
                                                                 user_key: str) -> None:
    # Like the WebUI's API, an unknown LoRA tag does not refuse the call: it renders and says so in `info`.
    result = api.txt2img(prompt="a red fox <lora:not_installed:0.7>", negative_prompt="blurry, lowres", seed=4242,
                         sampler_name="Euler a", cfg_scale=6, **SMALL)
    assert len(result.images) == 1 and result.image.size == (64, 64)
    infotext = result.image.info["parameters"]
    parsed = parse_infotext(infotext)
    assert parsed["Prompt"] == "a red fox <lora:not_installed:0.7>"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert [str(parsed[k]) for k in ("Seed", "Sampler", "Steps", "CFG scale")] == ["4242", "Euler a", "2", "6.0"]
    info = result.info
    assert info["seed"] == 4242 and info["all_seeds"] == [4242] and info["infotexts"] == [infotext]
    assert info["sd_model_name"] == "demo-tiny" and info["sd_model_hash"] == parsed["Model hash"]
    assert info["sampler_name"] == "Euler a"
    assert info["warnings"] == ["LoRA 'not_installed' is not installed; its tag was not applied"]
    assert result.parameters["prompt"] == "a red fox <lora:not_installed:0.7>"
    job = _job(farm, user_key, info["job_id"])  # a normal farm job, visible in the job API
    assert job["status"] == "succeeded" and job["seeds"] == [4242]


def test_img2img_with_mask(farm: Farm, api: webuiapi.WebUIApi) -> None:
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], mask_image=mask, prompt="a blue square", seed=77, denoising_strength=0.6,
                         mask_blur=2, sampler_name="Euler", **SMALL)
    assert len(result.images) == 1 and result.image.size == (64, 64)
    parsed = parse_infotext(result.image.info["parameters"])
    assert [str(parsed[k]) for k in ("Seed", "Denoising strength", "Mask blur")] == ["77", "0.6", "2"]
    assert result.info["all_seeds"] == [77] and result.info["denoising_strength"] == 0.6
    assert result.parameters["init_images"] is None  # not echoed unless include_init_images, like the WebUI


def test_models_samplers_options_and_readiness(farm: Farm, api: webuiapi.WebUIApi) -> None:
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["demo-tiny"]
    title = models[0]["title"]
    assert title == f"demo-tiny.safetensors [{models[0]['hash']}]" and models[0]["sha256"].startswith(models[0]["hash"])
    assert api.util_get_model_names() == [title]
    api.util_set_model("demo-tiny")
    assert api.util_get_current_model() == title
    assert {"Euler", "Euler a", "DPM++ 2M"} <= set(api.util_get_sampler_names())
    api.util_wait_for_ready(check_interval=0.2)
    assert api.get_progress()["state"]["job_count"] == 0


def test_options_are_per_key(farm: Farm, api: webuiapi.WebUIApi, user_key: str) -> None:
    api.set_options({"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    other = make_key(farm.env["DATABASE_URL"], "someone-else")
    with httpx.Client(base_url=farm.base_url, auth=("x", other)) as c:
        assert c.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    # The key's options are its job defaults: clip skip 2 and ENSD (written for an ancestral sampler) apply.
    result = api.txt2img(prompt="defaults", seed=9, sampler_name="Euler a", **SMALL)
    parsed = parse_infotext(result.image.info["parameters"])
    assert str(parsed["Clip skip"]) == "2" and str(parsed["ENSD"]) == "31337" and result.info["clip_skip"] == 2
    # A job's own override_settings still win over the key's options.
    result = api.txt2img(prompt="override", seed=9, override_settings={"CLIP_stop_at_last_layers": 1}, **SMALL)
    assert result.info["clip_skip"] == 1
    json.loads(json.dumps(result.info))
