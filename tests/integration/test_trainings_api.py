"""`POST /v1/trainings` over HTTP (issue 15): a good request becomes a queued job on the `train` queue with the
training contract; every bad field is a 422 naming it, with nothing stored or enqueued. The API runs in process
against real PostgreSQL and Redis, with no worker (so the queue message stays visible)."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from PIL import Image

from shared.jobs.training_spec import parse_learn_rate, rate_at
from tests.conftest import make_key
from tests.farm_harness import Farm


def _dataset(client: Any, count: int = 2) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            image = io.BytesIO()
            Image.new("RGB", (32, 32), ("red", "blue", "green")[i % 3]).save(image, "PNG")
            archive.writestr(f"{i}.png", image.getvalue())
            archive.writestr(f"{i}.txt", f"a square, colour {i}")
    resp = client.post("/v1/datasets", files={"file": ("set.zip", buffer.getvalue(), "application/zip")})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _jobs(farm: Farm) -> int:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        count = int(conn.execute(sa.text("SELECT count(*) FROM jobs WHERE mode = 'train'")).scalar_one())
    engine.dispose()
    return count


def test_a_training_is_a_queued_job_on_the_train_queue(api_only: Farm) -> None:
    key = make_key(api_only.env["DATABASE_URL"], "trainer-ok")
    with api_only.client(key) as client:
        dataset = _dataset(client)
        resp = client.post("/v1/trainings", json={
            "kind": "embedding", "name": "my-cat", "dataset": dataset, "steps": 12, "learn_rate": "0.05:4, 0.01",
            "training_width": 64, "training_height": 64, "nvpt": 2, "init_text": "cat", "save_every": 4})
        assert resp.status_code == 202, resp.text
        view = resp.json()
        assert (view["status"], view["kind"], view["name"], view["steps"], view["step"]) == (
            "queued", "embedding", "my-cat", 12, 0)
        assert view["params"]["template_filename"] == "subject_filewords.txt" and "items" not in view["params"]
        assert view["params"]["nvpt"] == 2 and view["params"]["seed"] >= 0
        job = client.get(f"/v1/jobs/{view['id']}").json()
        assert job["mode"] == "train" and job["status"] == "queued"
        assert client.get(f"/v1/trainings/{view['id']}").json()["id"] == view["id"]
        listed = client.get("/v1/trainings").json()
        assert listed["total"] == 1 and listed["trainings"][0]["id"] == view["id"]
        templates = {t["name"] for t in client.get("/v1/trainings/templates").json()["templates"]}
        assert {"subject.txt", "style_filewords.txt", "hypernetwork.txt"} <= templates
        with api_only.client(make_key(api_only.env["DATABASE_URL"], "stranger-t")) as stranger:
            assert stranger.get(f"/v1/trainings/{view['id']}").status_code == 404
        broker = redis.Redis.from_url(api_only.env["REDIS_URL"])
        assert broker.llen("train") >= 1  # its message waits for a worker that follows the train queue
        canceled = client.post(f"/v1/trainings/{view['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        created = client.post("/v1/trainings", json={"kind": "hypernetwork", "name": "fresh", "steps": 0,
                                                      "layer_structure": "1, 1.5, 1", "enable_sizes": [768, 64, 32]})
        assert created.status_code == 202, created.text  # steps 0: only creates the file, no dataset needed
        assert created.json()["params"]["layer_structure"] == [1.0, 1.5, 1.0]
        assert created.json()["params"]["enable_sizes"] == [32, 64, 768]  # 768: SD1.5's, skipped on the demo model


BAD = [
    ({"kind": "lora", "nvpt": 2}, "nvpt", "embedding trainings only"),
    ({"network_dim": 4}, "network_dim", "lora trainings only"),
    ({"kind": "lora", "min_bucket_reso": 512, "max_bucket_reso": 256}, "min_bucket_reso", "at most"),
    ({"kind": "lora", "lr_warmup_steps": 5}, "lr_warmup_steps", "no warm-up"),
    ({"kind": "lora", "enable_bucket": True, "training_width": 512, "max_bucket_reso": 256}, "max_bucket_reso",
     "at least"),
    ({"enable_bucket": True}, "enable_bucket", "lora trainings only"),
    ({"kind": "lycoris"}, "kind", ""),
    ({"name": "../evil"}, "name", "letters, digits"),
    ({"steps": -1}, "steps", ""),
    ({"dataset": None}, "dataset", "needs a dataset"),
    ({"start_from": "no-such-embedding"}, "start_from", "no embeddings/no-such-embedding.safetensors"),
    ({"steps": 10**9}, "steps", "at most"),
    ({"learn_rate": "fast"}, "learn_rate", "cannot read"),
    ({"learn_rate": "0.01:10, 0.001:5"}, "learn_rate", "steps must increase"),
    ({"training_width": 100}, "training_width", ""),
    ({"training_height": 4096}, "training_height", "at most"),
    ({"template_filename": "nope.txt"}, "template_filename", "subject.txt"),
    ({"template": ["a", "b"], "template_filename": "none.txt"}, "template", "not both"),
    ({"batch_size": 5}, "batch_size", "more than the dataset"),
    ({"model": "no-such-model"}, "model", "unknown model"),
    ({"dataset": "00000000-0000-0000-0000-000000000000"}, "dataset", "no dataset"),
    ({"layer_structure": "1, 2, 1"}, "layer_structure", "hypernetwork trainings only"),
    ({"kind": "hypernetwork", "layer_structure": "2, 1"}, "layer_structure", "starts and ends with 1"),
    ({"kind": "hypernetwork", "enable_sizes": [99999]}, "enable_sizes", "768"),
    ({"kind": "hypernetwork", "enable_sizes": [768, 320]}, "enable_sizes", "attention layers (32, 64)"),
    ({"kind": "hypernetwork", "activation_func": "explode"}, "activation_func", "relu"),
    ({"kind": "hypernetwork", "dropout_structure": "0, 0.5"}, "dropout_structure", "one value per"),
    ({"kind": "hypernetwork", "nvpt": 3}, "nvpt", "embedding trainings only"),
    ({"webhook_url": "http://10.0.0.1/hook"}, "webhook_url", ""),
]


@pytest.mark.parametrize(("change", "field", "says"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_field_is_a_422_naming_it_and_nothing_is_queued(api_only: Farm, change: dict[str, Any], field: str,
                                                              says: str) -> None:
    key = make_key(api_only.env["DATABASE_URL"], "trainer-bad")
    with api_only.client(key) as client:
        body = {"kind": "embedding", "name": "ok-name", "dataset": _dataset(client), "steps": 10,
                "training_width": 64, "training_height": 64, **change}
        before = _jobs(api_only)
        resp = client.post("/v1/trainings", json=body)
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert any(field in [str(part) for part in error["loc"]] for error in detail), detail
        assert says in str(detail)
        assert _jobs(api_only) == before


def test_an_existing_name_needs_overwrite_old(api_only: Farm) -> None:
    from pathlib import Path

    models = Path(api_only.env["RENDERFARM_MODELS_DIR"])
    (models / "embeddings").mkdir(exist_ok=True)
    existing = models / "embeddings" / "taken-name.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, 768)}, str(existing))
    try:
        key = make_key(api_only.env["DATABASE_URL"], "trainer-taken")
        with api_only.client(key) as client:
            body = {"kind": "embedding", "name": "taken-name", "dataset": _dataset(client), "steps": 2,
                    "training_width": 64, "training_height": 64}
            refused = client.post("/v1/trainings", json=body)
            assert refused.status_code == 422 and "overwrite_old" in refused.text
            assert refused.json()["detail"][0]["loc"] == ["body", "name"]
            assert client.post("/v1/trainings", json={**body, "overwrite_old": True}).status_code == 202
    finally:
        existing.unlink()


def test_the_webui_learning_rate_schedule() -> None:
    schedule = parse_learn_rate("0.005:100, 1e-3:1000, 1e-5", 3000)
    assert schedule == [(0.005, 100), (0.001, 1000), (1e-5, 3000)]
    assert [rate_at(schedule, s) for s in (0, 99, 100, 999, 1000, 2999)] == [0.005, 0.005, 0.001, 0.001, 1e-5, 1e-5]
    with pytest.raises(ValueError, match="only the last"):
        parse_learn_rate("0.1, 0.01:5", 10)


def test_the_webui_train_routes_name_the_webui_fields(api_only: Farm) -> None:
    key = make_key(api_only.env["DATABASE_URL"], "trainer-webui")
    with api_only.client(key) as client:
        dataset = _dataset(client)
        before = _jobs(api_only)
        not_an_id = client.post("/sdapi/v1/train/embedding", json={
            "embedding_name": "x", "data_root": "/home/me/pictures", "steps": 5})
        assert not_an_id.status_code == 422 and not_an_id.json()["detail"][0]["loc"] == ["body", "data_root"]
        missing = client.post("/sdapi/v1/train/embedding", json={
            "embedding_name": "never-created", "data_root": dataset, "steps": 5, "log_directory": "ignored"})
        assert missing.status_code == 422, missing.text
        assert missing.json()["detail"][0]["loc"] == ["body", "embedding_name"]
        bad_name = client.post("/sdapi/v1/create/embedding", json={"name": "../up", "num_vectors_per_token": 2})
        assert bad_name.status_code == 422 and bad_name.json()["detail"][0]["loc"] == ["body", "name"]
        not_a_number = client.post("/sdapi/v1/train/embedding", json={  # a 500 the OpenAPI fuzzer found
            "embedding_name": "x", "data_root": dataset, "clip_grad_value": "abc"})
        assert not_a_number.status_code == 422, not_a_number.text
        assert not_a_number.json()["detail"][0]["loc"] == ["body", "clip_grad_value"]
        too_many = client.post("/sdapi/v1/create/embedding", json={"name": "ok", "num_vectors_per_token": 500})
        assert too_many.status_code == 422
        assert too_many.json()["detail"][0]["loc"] == ["body", "num_vectors_per_token"]
        assert _jobs(api_only) == before
