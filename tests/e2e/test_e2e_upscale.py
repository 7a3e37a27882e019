"""Upscalers over HTTP: upscale jobs (the Extras tab) on ``POST /v1/jobs``, the WebUI's Extras routes through the
real ``webuiapi`` client, hires fix with a model upscaler, and sizes that are not multiples of 8. API + a Celery
worker + the demo checkpoint and the tiny random-weight upscalers `make up` builds (ESRGAN 4x, Compact 2x)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webuiapi
from PIL import Image, PngImagePlugin

from shared.webui.infotext import parse_infotext
from tests.conftest import make_key
from tests.farm_harness import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("farm", ["local"], indirect=True)]
SOURCE_INFOTEXT = "a lighthouse\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 60x44, Model: demo"


def source_png(width: int = 60, height: int = 44, infotext: str | None = SOURCE_INFOTEXT) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7) % 256, (y * 11) % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def key(farm: Farm) -> str:
    return make_key(farm.env["DATABASE_URL"], "upscale-user")


@pytest.fixture
def client(farm: Farm, key: str) -> Iterator[Any]:
    with farm.client(key) as c:
        yield c


def finished(client: Any, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return dict(job)
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def output(client: Any, job: dict[str, Any], index: int = 0) -> Image.Image:
    image = Image.open(io.BytesIO(client.get(job["images"][index]["url"]).content))
    image.load()
    return image


def upscale(client: Any, **fields: Any) -> dict[str, Any]:
    body = {"mode": "upscale", "image": b64(source_png()), **fields}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return finished(client, response.json()["id"])


def test_upscalers_are_listed_with_the_webuis_names(client: Any, farm: Farm, key: str) -> None:
    listed = {entry["name"]: entry for entry in client.get("/v1/upscalers").json()}
    assert listed["Latent (bicubic)"]["kind"] == "latent" and listed["Lanczos"]["kind"] == "builtin"
    assert listed["4x-demo-esrgan"]["file"] == "ESRGAN/4x-demo-esrgan.safetensors"
    assert listed["2x-demo-realesr-compact"]["refused_reason"] is None
    api = webuiapi.WebUIApi(baseurl=f"{farm.base_url}/sdapi/v1")
    api.set_auth("user", key)
    names = [entry["name"] for entry in api.get_upscalers()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "4x-demo-realesrgan" in names
    assert [m["name"] for m in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]


def test_an_upscale_job_writes_the_extras_infotext_and_keeps_the_source_parameters(client: Any) -> None:
    job = upscale(client, upscaler_1="4x-demo-esrgan", upscaling_resize=2)
    assert job["status"] == "succeeded", job["error"]
    image = output(client, job)
    assert image.size == (120, 88)
    assert job["images"][0]["infotext"] == "Postprocess upscale by: 2, Postprocess upscaler: 4x-demo-esrgan"
    assert image.info["postprocessing"] == job["images"][0]["infotext"]
    assert image.info["parameters"] == SOURCE_INFOTEXT  # the WebUI keeps the generation parameters


def test_scale_to_with_crop_and_a_second_upscaler_blended(client: Any) -> None:
    job = upscale(client, resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=60, upscaling_crop=True,
                  upscaler_1="2x-demo-compact", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)
    assert job["status"] == "succeeded", job["error"]
    assert output(client, job).size == (100, 60)
    assert job["images"][0]["infotext"] == (
        "Postprocess upscale to: 100x60, Postprocess crop to: 100x60, Postprocess upscaler: 2x-demo-compact, "
        "Postprocess upscaler 2: Lanczos")


def test_the_extras_routes_through_webuiapi(farm: Farm, key: str) -> None:
    api = webuiapi.WebUIApi(baseurl=f"{farm.base_url}/sdapi/v1")
    api.set_auth("user", key)
    source = Image.open(io.BytesIO(source_png()))
    single = api.extra_single_image(source, upscaler_1="4x-demo-realesrgan", upscaling_resize=1.5)
    assert single.image.size == (88, 64)  # 90x66 floored to multiples of 8, as the WebUI's Upscaler.upscale does
    assert single.info == "<p>Postprocess upscale by: 1.5, Postprocess upscaler: 4x-demo-realesrgan</p>"
    batch = api.extra_batch_images([source, source.resize((32, 32))], upscaler_1="Nearest", upscaling_resize=2)
    assert [image.size for image in batch.images] == [(120, 88), (64, 64)]


def test_hires_fix_with_a_model_upscaler_renders_the_target_size(client: Any) -> None:
    response = client.post("/v1/jobs", json={
        "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 3, "enable_hr": True,
        "hr_scale": 1.5, "hr_upscaler": "2x-demo-compact", "denoising_strength": 0.5, "hr_second_pass_steps": 1})
    assert response.status_code == 202, response.text
    job = finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert output(client, job).size == (96, 96)
    fields = parse_infotext(job["images"][0]["infotext"])
    assert fields["Hires upscaler"] == "2x-demo-compact" and (fields["Size-1"], fields["Size-2"]) == ("64", "64")


def test_sizes_that_are_not_multiples_of_8_render_as_the_webui_does(client: Any) -> None:
    """The latent is size // 8, the image 8 times that, and the infotext keeps the size asked for."""
    response = client.post("/v1/jobs", json={"prompt": "a lighthouse", "width": 100, "height": 76, "steps": 2,
                                             "seed": 3})
    assert response.status_code == 202, response.text
    job = finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert output(client, job).size == (96, 72)
    assert "Size: 100x76," in job["images"][0]["infotext"]


@pytest.mark.parametrize(("fields", "loc", "message"), [
    ({"upscaler_1": "4x-demo-esrgan", "upscaling_resize": 8, "image": None, "images": [None]},
     ["body", "images", 0], "over the limit"),
    ({"image": b64(b"not an image")}, ["body", "image"], "not"),
    ({"codeformer_visibility": 0.5}, ["body", "codeformer_visibility"], "licence"),
    ({"upscaler_1": "4x-nope"}, ["body", "upscaler_1"], "unknown upscaler"),
    ({"upscaler_2": "Latent"}, ["body", "upscaler_2"], "unknown upscaler"),
    ({"upscaling_resize": 0}, ["body", "upscaling_resize"], "greater than 0"),
    ({"images": []}, ["body", "images"], "at least 1"),
])
def test_bad_upscale_requests_are_422_and_store_nothing(client: Any, farm: Farm, fields: dict[str, Any],
                                                        loc: list[Any], message: str) -> None:
    before = client.get("/v1/jobs").json()["total"]
    body: dict[str, Any] = {"mode": "upscale", "image": b64(source_png()), **fields}
    if body.get("images") == [None]:  # a large input: 8x its size is over max_upscale_pixels (64 Mpx)
        body["images"], body["image"] = [b64(source_png(1200, 1000, None))], None
    body = {k: v for k, v in body.items() if v is not None}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in detail), detail
    assert client.get("/v1/jobs").json()["total"] == before


def test_a_file_spandrel_does_not_know_is_never_rendered_and_is_listed_refused(client: Any, models_dir: Path) -> None:
    """Submitted at once, before any worker checked the file: the job fails as the user's error naming the file (or,
    if a worker's check came first, the submit is a 422). Once the workers' check is in their heartbeat, the listing
    shows the reason and a job naming the file is a 422."""
    from tests.fake_files import write_model_file

    path = write_model_file(models_dir / "ESRGAN" / "not-an-upscaler.safetensors", b"weights of something else")
    try:
        response = client.post("/v1/jobs", json={"mode": "upscale", "image": b64(source_png()),
                                                 "upscaler_1": "not-an-upscaler"})
        if response.status_code == 202:
            job = finished(client, response.json()["id"])
            assert job["status"] == "failed" and job["error"]["type"] == "invalid_input"
            assert "not-an-upscaler" in job["error"]["message"]
        else:
            assert response.status_code == 422 and "not-an-upscaler" in response.text
        deadline, refused = time.monotonic() + 30, None
        while refused is None and time.monotonic() < deadline:
            listed = {e["name"]: e for e in client.get("/v1/upscalers").json()}
            refused = listed["not-an-upscaler"]["refused_reason"]
            time.sleep(0.5)
        assert refused is not None and "not-an-upscaler.safetensors" in refused
        assert listed["4x-demo-esrgan"]["architecture"] == "ESRGAN" and listed["2x-demo-compact"]["scale"] == 2
        response = client.post("/v1/jobs", json={"mode": "upscale", "image": b64(source_png()),
                                                 "upscaler_1": "not-an-upscaler"})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "upscaler_1"]
    finally:
        path.unlink()


def test_face_restoration_without_its_files_is_a_422_naming_the_field(client: Any) -> None:
    response = client.post("/v1/jobs", json={"prompt": "a face", "width": 64, "height": 64, "steps": 2,
                                             "restore_faces": True})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "restore_faces"]
    assert "GFPGAN" in response.json()["detail"][0]["msg"]
    response = client.post("/v1/jobs", json={"mode": "upscale", "image": b64(source_png()), "gfpgan_visibility": 1})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "gfpgan_visibility"]


@pytest.fixture(scope="module")
def face_files(models_dir: Path) -> Iterator[list[Path]]:
    """GFPGAN, its face detector and its face parser, random weights; the detector is built to find no face (one
    face costs ~10 s of CPU: tests/unit/test_face_restoration.py restores one and checks where pixels change)."""
    from devtools.demo_models.face_restoration import write_demo_face_restoration

    paths = write_demo_face_restoration(models_dir, faces=False)
    yield paths
    for path in paths:
        path.unlink()


def test_restore_faces_on_a_generation_job(client: Any, face_files: list[Path]) -> None:
    body = {"prompt": "a face", "width": 64, "height": 64, "steps": 2, "seed": 9}
    plain, restored = (finished(client, client.post("/v1/jobs", json={**body, **extra}).json()["id"])
                       for extra in ({}, {"restore_faces": True}))
    assert restored["status"] == "succeeded", restored["error"]
    assert "Face restoration: GFPGAN" in restored["images"][0]["infotext"]
    assert "Face restoration" not in plain["images"][0]["infotext"]
    # The worker loaded GFPGAN and ran the detector; with no face found the image is the plain one, as in the WebUI.
    assert output(client, plain).tobytes() == output(client, restored).tobytes()


def test_gfpgan_visibility_on_the_extras_route(farm: Farm, key: str, face_files: list[Path]) -> None:
    api = webuiapi.WebUIApi(baseurl=f"{farm.base_url}/sdapi/v1")
    api.set_auth("user", key)
    source = Image.open(io.BytesIO(source_png()))
    result = api.extra_single_image(source, upscaler_1="Lanczos", upscaling_resize=2, gfpgan_visibility=0.5)
    assert result.info == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos, GFPGAN visibility: 0.5</p>"
    assert result.image.size == (120, 88)
