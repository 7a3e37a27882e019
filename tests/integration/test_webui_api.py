"""The WebUI's vocabulary over HTTP: img2img inputs, uploads, png-info, styles, infotext (API only, no worker).

Every rejected request must leave nothing behind: no job row, no queue message, no stored object.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.conftest import make_key
from tests.farm_harness import Farm
from tests.unit.test_images import png_bytes, png_header_claiming

VALID = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
INFOTEXT = ("a lighthouse at dusk, (storm:1.2)\nNegative prompt: blurry\n"
            "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 4242, Size: 64x64, Model: demo-tiny, "
            "Clip skip: 2, ENSD: 31337, Version: v1.10.1")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _objects(farm: Farm) -> set[str]:
    root = Path(farm.env["STORAGE_URL"])
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


def _state(farm: Farm) -> tuple[int, int, set[str]]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    return rows, redis.Redis.from_url(farm.env["REDIS_URL"]).llen("render"), _objects(farm)


@pytest.fixture
def client(api_only: Farm) -> Iterator[httpx.Client]:
    with api_only.client() as c:
        yield c


def _huge_but_small_png() -> bytes:
    """4100x4100 one-bit pixels: a real image over the 4096x4096 input limit, a few kB on the wire."""
    buffer = io.BytesIO()
    Image.new("1", (4100, 4100)).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 64).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


GOOD = b64(png_bytes((64, 64)))
BAD_CASES = [
    ({"init_images": ["%%%"]}, ["body", "init_images", 0], "not valid base64"),
    ({"init_images": [b64(b"just text")]}, ["body", "init_images", 0], "not a readable image"),
    ({"init_images": [b64(png_header_claiming(30000, 30000))]}, ["body", "init_images", 0], "decompression bomb"),
    ({"init_images": [b64(_huge_but_small_png())]}, ["body", "init_images", 0], "over the limit of 16777216"),
    ({"init_images": [GOOD, "data:image/png;base64," + b64(_truncated_png())]}, ["body", "init_images", 1],
     "corrupt"),
    ({"init_images": [GOOD], "mask": b64(png_header_claiming(30000, 30000))}, ["body", "mask"], "bomb"),
    ({"init_images": ["upload:" + "a" * 32]}, ["body", "init_images", 0], "unknown upload"),
    ({"mode": "img2img"}, ["body", "init_images"], "at least one init image"),
    ({"mask": GOOD}, ["body", "mask"], "needs init_images"),
    ({"styles": ["Nope"]}, ["body", "styles", 0], "known styles: Portrait quality"),
    ({"override_settings": {"sd_hypernetwork": "x"}}, ["body", "override_settings", "sd_hypernetwork"],
     "accepts: sd_model_checkpoint"),
    ({"infotext": INFOTEXT.replace("CFG scale: 6.5", "CFG scale: 99")}, ["body", "infotext"],
     "infotext 'CFG scale': Input should be less than or equal to 30"),
    ({"infotext": INFOTEXT.replace("Model: demo-tiny", "Model: gone")}, ["body", "infotext"], "not installed"),
    ({"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, ["body", "hr_upscaler"], "unknown upscaler"),
    ({"hr_sampler_name": "Euler z"}, ["body", "hr_sampler_name"], "valid samplers"),
    ({"vae": "../Stable-diffusion/demo-tiny"}, ["body", "vae"], "not a name inside models/VAE/"),
    ({"denoising_strength": 1.5}, ["body", "denoising_strength"], "less than or equal to 1"),
    ({"output_format": "gif"}, ["body", "output_format"], "png"),
]


@pytest.mark.parametrize(("change", "loc", "message"), BAD_CASES,
                         ids=[f"{c[1][-1]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_bad_input_is_422_and_leaves_nothing(api_only: Farm, client: httpx.Client, change: dict, loc: list,
                                             message: str) -> None:
    before = _state(api_only)
    resp = client.post("/v1/jobs", json={**VALID, **change})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in detail), detail
    assert _state(api_only) == before


def test_img2img_stores_inputs_and_enqueues_once(api_only: Farm, client: httpx.Client) -> None:
    rows, queued, objects = _state(api_only)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    body = {**VALID, "init_images": ["data:image/png;base64," + GOOD, b64(png_bytes((96, 64)))],
            "mask": b64(buffer.getvalue()), "inpainting_fill": 2, "denoising_strength": 0.55}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    params = job["params"]
    assert job["mode"] == params["mode"] == "img2img"
    assert (params["denoising_strength"], params["inpainting_fill"]) == (0.55, 2)
    prefix = params["init_images"][0].rsplit("/", 1)[0]
    assert params["init_images"] == [f"{prefix}/init_0.png", f"{prefix}/init_1.png"]
    assert params["mask"] == f"{prefix}/mask.png"
    new_rows, new_queued, new_objects = _state(api_only)
    assert (new_rows, new_queued) == (rows + 1, queued + 1)
    assert new_objects - objects == {*params["init_images"], params["mask"]}
    root = Path(api_only.env["STORAGE_URL"])
    assert Image.open(root / params["init_images"][1]).size == (96, 64)
    stored_mask = Image.open(root / params["mask"])
    assert stored_mask.mode == "L" and stored_mask.getpixel((0, 0)) == 0 and stored_mask.getpixel((32, 32)) == 255


def test_uploads_are_owner_scoped(api_only: Farm, client: httpx.Client) -> None:
    resp = client.post("/v1/uploads", files={"file": ("in.png", png_bytes((64, 48)), "image/png")})
    assert resp.status_code == 201, resp.text
    upload = resp.json()
    assert upload["ref"] == f"upload:{upload['id']}" and (upload["width"], upload["height"]) == (64, 48)
    assert f"uploads/{upload['id']}.png" in _objects(api_only)

    resp = client.post("/v1/jobs", json={**VALID, "init_images": [upload["ref"]]})
    assert resp.status_code == 202, resp.text
    assert resp.json()["params"]["mode"] == "img2img"

    other = make_key(api_only.env["DATABASE_URL"], "someone-else")
    before = _state(api_only)
    with api_only.client(other) as theirs:
        resp = theirs.post("/v1/jobs", json={**VALID, "init_images": [upload["ref"]]})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "init_images", 0]
    assert "unknown upload" in resp.json()["detail"][0]["msg"]
    assert _state(api_only) == before


def test_upload_as_json_and_bad_uploads(api_only: Farm, client: httpx.Client) -> None:
    resp = client.post("/v1/uploads", json={"image": "data:image/png;base64," + b64(png_bytes((8, 8)))})
    assert resp.status_code == 201 and resp.json()["width"] == 8
    before = _objects(api_only)
    for kwargs, loc in (
        ({"files": {"file": ("bomb.png", png_header_claiming(30000, 30000), "image/png")}}, ["body", "file"]),
        ({"json": {"image": b64(b"nope")}}, ["body", "image"]),
        ({"json": {"image": GOOD, "name": "x"}}, ["body", "name"]),
        ({"files": {"other": ("x.png", png_bytes(), "image/png")}}, ["body", "file"]),
    ):
        resp = client.post("/v1/uploads", **kwargs)
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == loc, resp.text
    assert client.post("/v1/uploads", content=b"raw", headers={"Content-Type": "image/png"}).status_code == 415
    assert api_only.anonymous().post("/v1/uploads", json={"image": GOOD}).status_code == 401
    assert _objects(api_only) == before


def _png_with_infotext(text: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_png_info_round_trip(client: httpx.Client) -> None:
    png = _png_with_infotext(INFOTEXT)
    by_file = client.post("/v1/png-info", files={"file": ("img.png", png, "image/png")})
    by_json = client.post("/v1/png-info", json={"image": "data:image/png;base64," + b64(png)})
    assert by_file.status_code == by_json.status_code == 200, by_file.text
    assert by_file.json() == by_json.json()
    result = by_file.json()
    assert result["info"] == INFOTEXT
    parameters = result["parameters"]
    assert parameters["Prompt"] == "a lighthouse at dusk, (storm:1.2)" and parameters["Negative prompt"] == "blurry"
    assert (parameters["Steps"], parameters["Sampler"], parameters["Schedule type"]) == ("3", "DPM++ 2M", "Karras")
    assert (parameters["Size-1"], parameters["Size-2"], parameters["Clip skip"]) == ("64", "64", "2")

    # What png-info reads, a job can be made from: the WebUI's "send to txt2img".
    resp = client.post("/v1/jobs", json={"infotext": result["info"]})
    assert resp.status_code == 202, resp.text
    params = resp.json()["params"]
    assert (params["prompt"], params["negative_prompt"]) == ("a lighthouse at dusk, (storm:1.2)", "blurry")
    assert (params["steps"], params["sampler_name"], params["scheduler"]) == (3, "DPM++ 2M", "Karras")
    assert (params["seed"], params["cfg_scale"], params["width"], params["height"]) == (4242, 6.5, 64, 64)
    assert (params["clip_skip"], params["eta_noise_seed_delta"], params["model"]) == (2, 31337, "demo-tiny")


def test_png_info_of_a_plain_image_and_of_garbage(client: httpx.Client) -> None:
    plain = client.post("/v1/png-info", json={"image": b64(png_bytes())}).json()
    assert plain["info"] == "" and plain["items"] == {}
    resp = client.post("/v1/png-info", files={"file": ("x.png", b"garbage", "image/png")})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "file"]


def test_styles_route_and_styled_job(client: httpx.Client) -> None:
    styles = client.get("/v1/styles").json()
    assert [s["name"] for s in styles][:3] == ["Portrait quality", "Background wallpaper", "Common negative"]
    resp = client.post("/v1/jobs", json={**VALID, "prompt": "a knight", "styles": ["Common negative"]})
    assert resp.status_code == 202, resp.text
    params = resp.json()["params"]
    assert params["prompt"] == "(best quality), (masterpiece), (high resolution), a knight"
    assert params["negative_prompt"].startswith("lowres, ((bad anatomy))")


def test_override_settings_job(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={**VALID, "override_settings": {
        "sd_model_checkpoint": "demo-tiny", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 2,
        "eta_noise_seed_delta": 31337}})
    assert resp.status_code == 202, resp.text
    params = resp.json()["params"]
    assert (params["model"], params["vae"], params["clip_skip"], params["eta_noise_seed_delta"]) == \
        ("demo-tiny", None, 2, 31337)
