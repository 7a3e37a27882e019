"""Trainings on a real farm (issue 15): an API, a worker that follows the `train` queue as well as `render`, the
demo checkpoint at 64x64 and a tiny generated dataset, driven over HTTP like a user.

- An embedding trains, its probe loss falls, its checkpoints and previews are stored and listed, and the file is
  installed in the model store: listed at once, and a render whose prompt names it changes.
- The worker is SIGKILLed mid-training: the next attempt resumes from the last checkpoint (not step 0) and ends with
  the same loss curve as the same training run without interruption (exactly: CPU training is deterministic here;
  the tolerance stated below is for float noise only).
- A cancel stops a running training at its next step and keeps its last checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from devtools.embedded import EmbeddedPostgres
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env, make_key
from tests.farm_harness import Farm, Proc, start_api, start_worker, wait_until

pytestmark = pytest.mark.e2e
LOSS_TOLERANCE = 1e-5  # resumed vs uninterrupted, per step (float noise; measured 0 on this machine)


class TrainingFarm:
    def __init__(self, farm: Farm, logs: Path) -> None:
        self.farm, self.logs = farm, logs
        self.workers: list[Proc] = []
        self.key = make_key(farm.env["DATABASE_URL"], "trainer")

    def add_worker(self, name: str) -> Proc:
        proc = start_worker(self.farm.env, self.logs, name=name, queues="render,train")
        self.workers.append(proc)
        return proc

    def client(self) -> httpx.Client:
        return self.farm.client(self.key)

    def training(self, training_id: str) -> dict[str, Any]:
        with self.client() as client:
            resp = client.get(f"/v1/trainings/{training_id}")
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        """The data of every event of the job's SSE stream (`/v1/jobs/{id}/events`) until it ends."""
        events = []
        with httpx.stream("GET", f"{self.farm.base_url}/v1/jobs/{job_id}/events",
                          headers={"Authorization": f"Bearer {self.key}"}, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            events = [json.loads(line[len("data: "):]) for line in resp.iter_lines() if line.startswith("data: ")]
        return events

    def wait_done(self, training_id: str, timeout: float = 300) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            view = self.training(training_id)
            return view if view["status"] in ("succeeded", "failed", "canceled") else None

        return wait_until(done, timeout, interval=0.3, message=f"training {training_id} to end")


def _png(color: str, shape: str) -> bytes:
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((12, 12, 52, 52), fill=color)
    else:
        draw.rectangle((12, 12, 52, 52), fill=color)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def training_farm(postgres: EmbeddedPostgres, redis_db_url: Any, models_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingFarm]:
    logs = tmp_path_factory.mktemp("training-farm")
    env = farm_env(database_url=_fresh_database(postgres, "farm_training"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY,
                   RENDERFARM_LEASE_SECONDS="5", RENDERFARM_REPUBLISH_AFTER_SECONDS="2",
                   RENDERFARM_TRAINING_PROGRESS_SECONDS="0.2")
    api, base_url = start_api(env, logs)
    tf = TrainingFarm(Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api]), logs)
    try:
        tf.add_worker("t1")
        yield tf
    finally:
        for proc in tf.workers:
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        api.stop()


@pytest.fixture(scope="module")
def dataset(training_farm: TrainingFarm) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (color, shape) in enumerate([("red", "circle"), ("blue", "square"), ("red", "square"),
                                            ("blue", "circle")]):
            archive.writestr(f"cat/{i}.png", _png(color, shape))
            archive.writestr(f"cat/{i}.txt", f"a {color} {shape}")
    with training_farm.client() as client:
        resp = client.post("/v1/datasets", files={"file": ("cat.zip", buffer.getvalue(), "application/zip")})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])


def _body(dataset: str, name: str, **extra: Any) -> dict[str, Any]:
    """Settings under which an embedding measurably lowers the demo model's probe loss (tests/unit/test_training.py
    says why: the demo UNet is random, so many vectors and a high rate are needed to move its ~1% of conditioning)."""
    return {"kind": "embedding", "name": name, "dataset": dataset, "steps": 30, "seed": 5, "batch_size": 4,
            "learn_rate": "0.2:20, 0.1", "template": ["[name]"], "nvpt": 32, "init_text": "shape",
            "clip_grad_mode": "value", "clip_grad_value": 0.1, "training_width": 64, "training_height": 64, **extra}


def _render(farm: TrainingFarm, prompt: str) -> bytes:
    """The pixels of a 64x64 render of ``prompt`` (seed 11)."""
    with farm.client() as client:
        job = client.post("/v1/jobs", json={"prompt": prompt, "width": 64, "height": 64, "steps": 3, "seed": 11,
                                            "sampler_name": "Euler"})
        assert job.status_code == 202, job.text
        done = farm.farm.wait_for(job.json()["id"], key=farm.key)
        assert done["status"] == "succeeded", done
        png = client.get(done["images"][0]["url"]).content
        return Image.open(io.BytesIO(png)).convert("RGB").tobytes()  # the pixels: the infotext differs anyway


def test_an_embedding_trains_is_installed_and_changes_a_render(training_farm: TrainingFarm, dataset: str) -> None:
    before = _render(training_farm, "a photo of shapecat")
    with training_farm.client() as client:
        resp = client.post("/v1/trainings", json=_body(dataset, "shapecat", save_every=4, create_image_every=6,
                                                         preview_steps=3))
        assert resp.status_code == 202, resp.text
        training_id = resp.json()["id"]
    view = training_farm.wait_done(training_id)
    assert view["status"] == "succeeded", view
    assert view["step"] == 30 and view["progress"] == 1.0 and len(view["losses"]) == 30
    before_loss, after_loss = view["probe_loss"]
    assert after_loss < before_loss, view["probe_loss"]
    assert view["checkpoint_step"] == 28  # every 4 steps, not at the last one
    assert [p["step"] for p in view["previews"]] == [6, 12, 18, 24, 30]
    assert view["result"]["file"] == "embeddings/shapecat.safetensors" and view["result"]["name"] == "shapecat"
    as_job = training_farm.job_events(training_id)[-1]  # the job's SSE stream carries the training's state
    assert as_job["status"] == "succeeded" and as_job["mode"] == "train"
    assert as_job["training"]["step"] == 30 and as_job["training"]["checkpoint_step"] == 28
    assert as_job["training"]["result"]["file"] == "embeddings/shapecat.safetensors"
    with training_farm.client() as client:
        preview = client.get(view["previews"][0]["url"])
        assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).size == (64, 64)
        # Lists read the model store's registry at most once a second per API process.
        wait_until(lambda: "shapecat" in [entry["name"] for entry in client.get("/v1/embeddings").json()], 5,
                   message="the new embedding in the list")
        assert client.get("/sdapi/v1/embeddings").json()["loaded"]["shapecat"]["vectors"] == 32
    after = _render(training_farm, "a photo of shapecat")
    assert after != before  # the word is now the trained embedding
    with training_farm.client() as client:
        again = client.post("/v1/trainings", json=_body(dataset, "shapecat"))
        assert again.status_code == 422 and again.json()["detail"][0]["loc"] == ["body", "name"]


def test_a_killed_worker_resumes_from_the_last_checkpoint_with_the_same_losses(training_farm: TrainingFarm,
                                                                                dataset: str) -> None:
    steps = 160
    with training_farm.client() as client:
        killed = client.post("/v1/trainings", json=_body(dataset, "resumed", steps=steps, save_every=10)).json()
        reference = client.post("/v1/trainings", json=_body(dataset, "uninterrupted", steps=steps,
                                                             save_every=10)).json()
    wait_until(lambda: (training_farm.training(killed["id"])["checkpoint_step"] or 0) >= 20, 240, interval=0.1,
               message="the first checkpoints")
    victim = training_farm.workers[0]
    at_kill = training_farm.training(killed["id"])
    assert at_kill["status"] == "running" and at_kill["step"] < steps
    os.killpg(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait()
    training_farm.add_worker("t2")
    resumed = training_farm.wait_done(killed["id"])
    assert resumed["status"] == "succeeded", resumed
    assert resumed["attempt"] == 2
    worker_log = training_farm.workers[-1].log()
    assert f"training {killed['id']}: resuming from the checkpoint at step" in worker_log
    assert "resuming from the checkpoint at step 0" not in worker_log
    straight = training_farm.wait_done(reference["id"])
    assert straight["status"] == "succeeded" and straight["attempt"] == 1
    ours, theirs = dict(map(tuple, resumed["losses"])), dict(map(tuple, straight["losses"]))
    common = sorted(set(ours) & set(theirs))
    assert len(common) >= steps // 2  # both curves thinned the same way
    assert max(abs(ours[s] - theirs[s]) for s in common) <= LOSS_TOLERANCE
    assert abs(resumed["probe_loss"][1] - straight["probe_loss"][1]) <= LOSS_TOLERANCE


def test_a_cancel_stops_a_running_training_and_keeps_its_checkpoint(training_farm: TrainingFarm,
                                                                    dataset: str) -> None:
    with training_farm.client() as client:
        training = client.post("/v1/trainings", json=_body(dataset, "canceled", steps=5000, save_every=5)).json()
    wait_until(lambda: (training_farm.training(training["id"])["checkpoint_step"] or 0) >= 5, 240, interval=0.1,
               message="a checkpoint")
    with training_farm.client() as client:
        resp = client.post(f"/v1/trainings/{training['id']}/cancel")
        assert resp.status_code == 200, resp.text
    view = training_farm.wait_done(training["id"], timeout=60)
    assert view["status"] == "canceled" and view["step"] < 5000
    assert view["checkpoint_step"] >= 5 and view["result"] is None
    objects = Path(training_farm.farm.env["STORAGE_URL"]) / "trainings" / training["id"]
    assert (objects / "checkpoint.pt").is_file()
    # An admin's retry goes on from that checkpoint, on the train queue.
    with httpx.Client(base_url=training_farm.farm.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        retried = admin.post(f"/v1/admin/jobs/{training['id']}/retry")
        assert retried.status_code == 202, retried.text
    again = retried.json()["job"]["id"]
    wait_until(lambda: training_farm.training(again)["status"] == "running", 60, message="the retry to run")
    log_line = f"training {again}: resuming from the checkpoint at step {view['checkpoint_step']}"
    wait_until(lambda: log_line in training_farm.workers[-1].log(), 30, message="the retry to resume")
    with training_farm.client() as client:
        assert client.post(f"/v1/trainings/{again}/cancel").status_code == 200
    assert training_farm.wait_done(again, timeout=60)["status"] == "canceled"


def test_a_hypernetwork_trains_and_its_tag_changes_a_render(training_farm: TrainingFarm, dataset: str) -> None:
    with training_farm.client() as client:
        resp = client.post("/v1/trainings", json={
            "kind": "hypernetwork", "name": "shapenet", "dataset": dataset, "steps": 16, "seed": 5,
            "learn_rate": "0.02", "batch_size": 2, "gradient_step": 2, "training_width": 64, "training_height": 64,
            "enable_sizes": [768, 32, 64], "layer_structure": "1, 2, 1", "activation_func": "relu"})
        assert resp.status_code == 202, resp.text
    view = training_farm.wait_done(resp.json()["id"])
    assert view["status"] == "succeeded", view
    assert view["probe_loss"][1] < view["probe_loss"][0]
    assert view["result"]["file"] == "hypernetworks/shapenet.pt" and view["result"]["name"] == "<hypernet:shapenet:1>"
    with training_farm.client() as client:
        wait_until(lambda: "shapenet" in [h["name"] for h in client.get("/sdapi/v1/hypernetworks").json()], 5,
                   message="the new hypernetwork in the list")
    plain = _render(training_farm, "a red circle")
    assert _render(training_farm, "a red circle <hypernet:shapenet:1>") != plain
    assert _render(training_farm, "a red circle <hypernet:shapenet:0>") == plain


def test_the_webui_routes_create_then_train_an_embedding(training_farm: TrainingFarm, dataset: str) -> None:
    with training_farm.client() as client:
        created = client.post("/sdapi/v1/create/embedding", json={
            "name": "webui-emb", "num_vectors_per_token": 4, "overwrite_old": False, "init_text": "shape"})
        assert created.status_code == 200, created.text
        assert created.json() == {"info": "create embedding filename: models/embeddings/webui-emb.safetensors"}
        # Lists read the model store's registry at most once a second per API process.
        loaded = wait_until(lambda: client.get("/sdapi/v1/embeddings").json()["loaded"].get("webui-emb"), 5,
                            message="the new embedding in the list")
        assert loaded["vectors"] == 4
        trained = client.post("/sdapi/v1/train/embedding", json={
            "embedding_name": "webui-emb", "learn_rate": "0.1", "batch_size": 2, "gradient_step": 1,
            "data_root": dataset, "log_directory": "textual_inversion", "training_width": 64, "training_height": 64,
            "varsize": False, "steps": 6, "clip_grad_mode": "disabled", "clip_grad_value": "0.1",
            "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once", "use_weight": False,
            "create_image_every": 0, "save_embedding_every": 0, "template_filename": "subject.txt",
            "save_image_with_stored_embedding": True, "preview_from_txt2img": False})
        assert trained.status_code == 200, trained.text
        assert trained.json() == {
            "info": "train embedding complete: filename: models/embeddings/webui-emb.safetensors error: None"}
        trainings = client.get("/v1/trainings", params={"limit": 50}).json()["trainings"]
        mine = [t for t in trainings if t["name"] == "webui-emb"]
        assert [t["steps"] for t in mine] == [6, 0]  # newest first: the training, then the creation
        assert mine[0]["params"]["start_from"] == "embeddings/webui-emb.safetensors"
        assert client.get("/sdapi/v1/embeddings").json()["loaded"]["webui-emb"]["vectors"] == 4


def test_a_pause_holds_queued_trainings_too(training_farm: TrainingFarm, dataset: str) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=training_farm.farm.base_url, headers=admin, timeout=30) as client:
        assert client.post("/v1/admin/queue/pause").json()["paused"] is True
    try:
        with training_farm.client() as client:
            held = client.post("/v1/trainings", json=_body(dataset, "held", steps=2)).json()
        time.sleep(3)  # a 2-step training takes well under that: a worker following `train` would have run it
        assert training_farm.training(held["id"])["status"] == "queued"
    finally:
        with httpx.Client(base_url=training_farm.farm.base_url, headers=admin, timeout=30) as client:
            assert client.post("/v1/admin/queue/resume").json()["paused"] is False
    assert training_farm.wait_done(held["id"], timeout=120)["status"] == "succeeded"


def test_a_lora_trains_in_kohyas_format_and_its_tag_changes_a_render(training_farm: TrainingFarm,
                                                                     dataset: str) -> None:
    with training_farm.client() as client:
        resp = client.post("/v1/trainings", json={
            "kind": "lora", "name": "shapelora", "dataset": dataset, "steps": 12, "seed": 5, "learn_rate": "0.01",
            "batch_size": 2, "network_dim": 4, "network_alpha": 4, "lr_scheduler": "cosine",
            "training_width": 64, "training_height": 64, "save_every": 6})
        assert resp.status_code == 202, resp.text
    view = training_farm.wait_done(resp.json()["id"])
    assert view["status"] == "succeeded", view
    assert view["probe_loss"][1] < view["probe_loss"][0] and view["checkpoint_step"] == 6
    assert view["result"]["file"] == "Lora/shapelora.safetensors" and view["result"]["name"] == "<lora:shapelora:1>"
    with training_farm.client() as client:
        def listed() -> dict[str, Any] | None:
            found = [lora for lora in client.get("/sdapi/v1/loras").json() if lora["name"] == "shapelora"]
            return found[0] if found else None

        lora = wait_until(listed, 5, message="the new LoRA in the list")
        assert lora["metadata"]["ss_network_module"] == "networks.lora"
        assert lora["metadata"]["ss_network_dim"] == "4" and lora["metadata"]["ss_output_name"] == "shapelora"
    plain = _render(training_farm, "a blue square")
    assert _render(training_farm, "a blue square <lora:shapelora:1>") != plain
    assert _render(training_farm, "a blue square <lora:shapelora:0>") == plain
