"""ControlNet over HTTP, as users send it: the farm's own job field, our users' pasted infotext, the real ``webuiapi``
client's ``ControlNetUnit`` through txt2img and img2img, and the extension's routes. API + a Celery worker + the
tiny demo checkpoint and the demo ControlNet `make up` builds (64x64, 2 steps)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import webuiapi
from PIL import Image

from shared.webui.infotext import parse_infotext
from tests.conftest import make_key
from tests.farm_harness import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("farm", ["local"], indirect=True)]
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 11, "prompt": "a lighthouse"}
USERS_UNIT = ("ControlNet Enabled: True, ControlNet Preprocessor: depth_midas, ControlNet Model: "
              "controlnetPreTrained_depthV10 [400750f6], ControlNet Weight: 0.8, ControlNet Starting Step: 0, "
              "ControlNet Ending Step: 1, ControlNet Resize Mode: Resize and Fill, ControlNet Pixel Perfect: False, "
              "ControlNet Control Mode: My prompt is more important, ControlNet Preprocessor Parameters: "
              '"(512, 64, 64)"')


def square() -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), (16, 16, 48, 48))
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def user_key(farm: Farm) -> str:
    return make_key(farm.env["DATABASE_URL"], "controlnet-user")


@pytest.fixture
def title(farm: Farm, user_key: str) -> str:
    with farm.client(user_key) as c:
        models = c.get("/v1/controlnet/models").json()
    (demo,) = [m for m in models if m["name"] == "demo-tiny-control"]
    assert demo["loadable"] and demo["architecture"] == "demo-tiny" and demo["layout"] == "ldm"
    return str(demo["title"])


def finished(farm: Farm, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    with farm.client(key) as c:
        while time.monotonic() < deadline:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                return dict(job)
            time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def image_of(farm: Farm, key: str, job: dict[str, Any]) -> Image.Image:
    with farm.client(key) as c:
        data = c.get(job["images"][0]["url"]).content
    return Image.open(io.BytesIO(data))


def job_count(farm: Farm, key: str) -> int:
    with farm.client(key) as c:
        return int(c.get("/v1/jobs").json()["total"])


def test_a_job_with_a_unit_renders_it_and_records_it_in_the_infotext(farm: Farm, user_key: str, title: str) -> None:
    with farm.client(user_key) as c:
        plain = c.post("/v1/jobs", json=SMALL).json()["id"]
        unit = {"module": "canny", "model": title, "image": b64(square()), "weight": 1.2}
        steered = c.post("/v1/jobs", json={**SMALL, "controlnet": [unit]}).json()["id"]
    jobs = [finished(farm, user_key, job_id) for job_id in (plain, steered)]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], jobs
    images = [np.asarray(image_of(farm, user_key, job).convert("RGB")).astype(int) for job in jobs]
    assert np.abs(images[0] - images[1]).mean() > 1.0
    parsed = parse_infotext(image_of(farm, user_key, jobs[1]).info["parameters"])
    assert parsed["ControlNet 0"] == (
        f"Module: canny, Model: {title}, Weight: 1.2, Resize Mode: Crop and Resize, Processor Res: 512, "
        "Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
        "Control Mode: Balanced")


def test_our_users_infotext_gives_their_unit_once_the_farm_has_what_it_names(farm: Farm, user_key: str,
                                                                              title: str) -> None:
    infotext = f"a lighthouse\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, {USERS_UNIT}"
    before = job_count(farm, user_key)
    with farm.client(user_key) as c:
        refused = c.post("/v1/jobs", json={"infotext": infotext, "controlnet": [{"image": b64(square())}]})
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"][0]
        assert "depth_midas" in detail["msg"] and "canny" in detail["msg"]  # names it and lists what runs
        assert detail["loc"] == ["body", "infotext"] and "ControlNet 0 'module'" in detail["msg"]
        # A field the request sets itself is named as the request's, infotext or not.
        own = c.post("/v1/jobs", json={"infotext": infotext, "controlnet": [
            {"image": b64(square()), "module": "no_such_module"}]})
        assert own.status_code == 422 and own.json()["detail"][0]["loc"] == ["body", "controlnet", 0, "module"]
        # depth_midas needs annotator weights; the user picks a preprocessor that runs and the farm's model.
        sent = c.post("/v1/jobs", json={"infotext": infotext, "controlnet": [
            {"image": b64(square()), "module": "invert", "model": title}]})
        assert sent.status_code in (200, 201, 202), sent.text
    assert job_count(farm, user_key) == before + 1  # the refused one left nothing behind
    job = finished(farm, user_key, sent.json()["id"])
    assert job["status"] == "succeeded", job
    parsed = parse_infotext(image_of(farm, user_key, job).info["parameters"])
    assert parsed["ControlNet 0"].startswith(f"Module: invert, Model: {title}, Weight: 0.8, Resize Mode: Resize and "
                                             "Fill,")
    assert parsed["ControlNet 0"].endswith("Control Mode: My prompt is more important")


def test_a_unit_naming_a_missing_model_or_preprocessor_is_a_422_with_nothing_enqueued(farm: Farm, user_key: str,
                                                                                      title: str) -> None:
    before = job_count(farm, user_key)
    cases = [({"module": "canny", "model": "no_such_model [12345678]"}, "model", title),
             ({"module": "no_such_module", "model": title}, "module", "canny"),
             ({"module": "canny", "model": title, "threshold_a": 300}, "threshold_a", "between 1 and 255"),
             ({"module": "canny", "model": title, "image": None}, "image", "txt2img")]
    with farm.client(user_key) as c:
        for unit, field, named in cases:
            body = {**SMALL, "controlnet": [{"image": b64(square()), **unit}]}
            resp = c.post("/v1/jobs", json=body)
            assert resp.status_code == 422, resp.text
            detail = resp.json()["detail"][0]
            assert detail["loc"] == ["body", "controlnet", 0, field] and named in detail["msg"], detail
    assert job_count(farm, user_key) == before


@pytest.fixture
def api(farm: Farm, user_key: str) -> Iterator[webuiapi.WebUIApi]:
    client = webuiapi.WebUIApi(baseurl=f"{farm.base_url}/sdapi/v1", username="anyone", password=user_key)
    yield client
    client.session.close()


def test_webuiapi_controlnet_units_through_txt2img_and_img2img(api: webuiapi.WebUIApi, title: str) -> None:
    assert api.controlnet_version() == 3
    assert title in api.controlnet_model_list()
    assert {"none", "canny", "invert"} <= set(api.controlnet_module_list())
    unit = webuiapi.ControlNetUnit(image=square(), module="canny", model=title, control_mode=2)
    result = api.txt2img(controlnet_units=[unit], **SMALL)
    assert result.image.size == (64, 64)
    parsed = parse_infotext(result.info["infotexts"][0])
    assert parsed["ControlNet 0"].startswith(f"Module: canny, Model: {title}, Weight: 1.0, Resize Mode: Resize and "
                                             "Fill, Processor Res: 512, Threshold A: 64.0, Threshold B: 64.0")
    assert parsed["ControlNet 0"].endswith("Control Mode: ControlNet is more important")
    # img2img: a unit without its own image uses the init image, as the extension does.
    result = api.img2img(images=[square()], controlnet_units=[webuiapi.ControlNetUnit(module="none", model=title)],
                         denoising_strength=0.6, **SMALL)
    assert result.image.size == (64, 64) and "ControlNet 0" in parse_infotext(result.info["infotexts"][0])
    detected = api.controlnet_detect(images=[square()], module="canny", threshold_a=100, threshold_b=200)
    edges = np.asarray(detected.image.convert("L"))  # at the preprocessor's resolution (512), as the extension's
    assert edges.shape == (512, 512) and edges[136:376, 120:136].max() == 255 and edges[200:300, 200:300].max() == 0


def test_the_webui_api_names_the_unit_in_alwayson_scripts(farm: Farm, user_key: str) -> None:
    body = {**SMALL, "alwayson_scripts": {"ControlNet": {"args": [
        {"enabled": False, "module": "canny"},
        {"enabled": True, "module": "canny", "model": "missing", "image": b64(square())}]}}}
    with farm.client(user_key) as c:
        resp = c.post("/sdapi/v1/txt2img", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", "alwayson_scripts", "ControlNet", "args", 1, "model"]
