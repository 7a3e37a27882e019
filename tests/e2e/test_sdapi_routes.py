"""Raw HTTP against every ``/sdapi/v1`` route: auth, shapes, errors that name the field, nothing left behind."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ADMIN_KEY, make_key
from tests.farm_harness import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("farm", ["local"], indirect=True)]
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def key(farm: Farm) -> str:
    return make_key(farm.env["DATABASE_URL"], f"raw-{time.monotonic_ns()}")


@pytest.fixture
def client(farm: Farm, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{farm.base_url}/sdapi/v1", auth=("user", key), timeout=120) as c:
        yield c


def _jobs(farm: Farm, owner_key: str) -> int:
    with farm.client(owner_key) as c:
        return c.get("/v1/jobs").json()["total"]


def test_auth_basic_bearer_and_refusal(farm: Farm, key: str) -> None:
    base = f"{farm.base_url}/sdapi/v1/options"
    assert httpx.get(base).status_code == 401
    assert "Basic" in httpx.get(base).headers["www-authenticate"]
    assert httpx.get(base, auth=("user", "rf_wrong")).status_code == 401
    assert httpx.get(base, auth=("anyone", key)).status_code == 200
    assert httpx.get(base, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_list_routes_have_the_webui_shapes(client: httpx.Client) -> None:
    model = client.get("/sd-models").json()[0]
    assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    sampler = client.get("/samplers").json()[0]
    assert set(sampler) == {"name", "aliases", "options"}
    assert {"name", "label"} <= set(client.get("/schedulers").json()[0])
    assert {"name", "model_name", "model_path", "model_url", "scale"} <= set(client.get("/upscalers").json()[0])
    assert {"name": "Latent"} in client.get("/latent-upscale-modes").json()
    assert isinstance(client.get("/sd-vae").json(), list) and isinstance(client.get("/loras").json(), list)
    assert set(client.get("/embeddings").json()) == {"loaded", "skipped"}
    styles = client.get("/prompt-styles").json()
    assert styles and set(styles[0]) == {"name", "prompt", "negative_prompt"}
    assert client.get("/scripts").json() == {"txt2img": [], "img2img": []}
    flags = client.get("/cmd-flags").json()
    assert flags["api"] is True and flags["ckpt_dir"] is None and flags["models_dir"] is None  # no server paths
    memory = client.get("/memory").json()
    assert set(memory) == {"ram", "cuda"} and "total" not in memory["ram"]
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings"):
        assert client.post(f"/{path}").status_code == 403


def test_admin_keys_see_paths_and_may_refresh(farm: Farm) -> None:
    admin = httpx.Client(base_url=f"{farm.base_url}/sdapi/v1", auth=("admin", ADMIN_KEY), timeout=30)
    with admin:
        assert admin.get("/cmd-flags").json()["ckpt_dir"].endswith("Stable-diffusion")
        assert admin.get("/memory").json()["ram"]["total"] > 0
        for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings"):
            resp = admin.post(f"/{path}")
            assert resp.status_code == 200 and resp.json() is None


def test_options_get_post_and_errors(client: httpx.Client) -> None:
    options = client.get("/options").json()
    assert options["sd_model_checkpoint"].startswith("demo-tiny.safetensors [")
    assert options["CLIP_stop_at_last_layers"] == 1 and options["sd_vae"] == "Automatic"
    assert client.post("/options", json=options).status_code == 200  # a round-trip of the whole dict is fine
    bad = client.post("/options", json={"sd_model_checkpoint": "nope"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    unknown = client.post("/options", json={"show_progress_every_n_steps": 5})
    assert unknown.status_code == 422 and "show_progress_every_n_steps" in unknown.text
    assert client.post("/options", json={"CLIP_stop_at_last_layers": 13}).status_code == 422
    assert client.get("/options").json()["CLIP_stop_at_last_layers"] == 1  # nothing changed


def test_txt2img_answer_png_info_and_progress(farm: Farm, client: httpx.Client, key: str) -> None:
    resp = client.post("/txt2img", json={"prompt": "a boat", "seed": 11, "batch_size": 2, "future_field": 1, **SMALL})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 2
    info = json.loads(body["info"])
    expected = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
                "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
                "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
                "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
                "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
                "clip_skip", "is_using_inpainting_conditioning", "version"}
    assert expected <= set(info)
    assert info["all_seeds"] == [11, 12] and len(info["all_subseeds"]) == 2 and info["version"]
    assert body["parameters"]["prompt"] == "a boat" and body["parameters"]["sampler_index"] == "Euler"
    assert resp.headers["x-renderfarm-job-id"] == info["job_id"]

    png = client.post("/png-info", json={"image": "data:image/png;base64," + body["images"][1]}).json()
    assert png["info"] == info["infotexts"][1] and str(png["parameters"]["Seed"]) == "12"
    assert client.post("/png-info", json={"image": ""}).json()["info"] == ""
    assert client.post("/png-info", json={"image": "not base64!"}).status_code == 422

    progress = client.get("/progress").json()
    assert set(progress) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert info["job_id"] in progress["textinfo"] and progress["current_image"] is None


def test_send_images_false_and_styles(client: httpx.Client) -> None:
    styles = client.get("/prompt-styles").json()
    resp = client.post("/txt2img", json={"prompt": "a tree", "styles": [styles[0]["name"]], "send_images": False,
                                         **SMALL})
    assert resp.status_code == 200, resp.text
    info = json.loads(resp.json()["info"])
    assert resp.json()["images"] == [] and info["styles"] == [styles[0]["name"]] and info["prompt"] == "a tree"


@pytest.mark.parametrize("payload, loc", [
    ({"script_name": "X/Y/Z plot"}, ["body", "script_name"]),
    ({"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}}},
     ["body", "alwayson_scripts", "ADetailer"]),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "module": "canny"}]}}},
     ["body", "alwayson_scripts", "ControlNet", "args", 0, "model"]),
    ({"sampler_name": "Nope"}, ["body", "sampler_name"]),
    ({"override_settings": {"sd_model_checkpoint": "missing"}}, ["body", "override_settings", "sd_model_checkpoint"]),
    ({"width": 4096}, ["body", "width"]),
])
def test_bad_requests_are_422_and_create_no_job(farm: Farm, client: httpx.Client, key: str, payload: dict,
                                                 loc: list) -> None:
    resp = client.post("/txt2img", json={"prompt": "x", **SMALL, **payload})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == loc
    assert _jobs(farm, key) == 0


def test_img2img_needs_an_image_and_accepts_data_urls(farm: Farm, client: httpx.Client) -> None:
    assert client.post("/img2img", json={"prompt": "x", **SMALL}).status_code == 422
    with farm.client() as c:
        png = c.post("/sdapi/v1/txt2img", json={"prompt": "seed image", "seed": 3, **SMALL}).json()["images"][0]
    resp = client.post("/img2img", json={"init_images": ["data:image/png;base64," + png], "prompt": "again",
                                         "seed": 5, "include_init_images": True, **SMALL})
    assert resp.status_code == 200, resp.text
    assert json.loads(resp.json()["info"])["all_seeds"] == [5]
    assert resp.json()["parameters"]["init_images"][0].endswith(png[-20:])
    base64.b64decode(resp.json()["images"][0])


def test_interrupt_cancels_only_the_callers_running_job(farm: Farm, key: str) -> None:
    other = make_key(farm.env["DATABASE_URL"], "bystander")
    with farm.client(key) as c:
        job = c.post("/v1/jobs", json={"prompt": "slow", "width": 64, "height": 64, "steps": 150,
                                       "batch_size": 8, "n_iter": 4}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(f"{farm.base_url}/sdapi/v1/interrupt", auth=("u", other)).json() == {}
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"  # a bystander stops nothing
        assert httpx.post(f"{farm.base_url}/sdapi/v1/skip", auth=("u", key)).json() == {}
    assert farm.wait_for(job["id"], key)["status"] == "canceled"
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT cancel_requested_at IS NOT NULL FROM jobs WHERE id = :id"),
                            {"id": job["id"]}).scalar_one()
    engine.dispose()
