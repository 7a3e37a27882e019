"""The Python client against a real farm (API + Celery worker on the tiny demo model)."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image
from renderfarm_client import (
    AsyncClient,
    Client,
    Conflict,
    Job,
    JobFailed,
    NotFound,
    ValidationError,
    WebhookVerificationFailed,
    verify_webhook,
)
from renderfarm_client.pnginfo import read_png_text

from tests.client.conftest import TINY, Recorder
from tests.farm_harness import Farm, wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e
LOCAL = pytest.mark.parametrize("farm", ["local"], indirect=True)  # the client does not care where images live


@LOCAL
def test_wait_follows_the_event_stream_and_reports_progress(farm: Farm, owner_key: str) -> None:
    recorder = Recorder()
    updates: list[Job] = []
    with Client(farm.base_url, owner_key, transport=recorder) as client:
        submitted = client.submit("a lighthouse", seed=11, **{**TINY, "steps": 8})
        job = client.wait(submitted.id, on_progress=updates.append, timeout=120)
    assert job.status == "succeeded" and len(job.images) == 1 and job.images[0].seed == 11
    assert ("GET", f"/v1/jobs/{job.id}/events", 200) in recorder.seen
    assert not any("wait=" in str(r.url) for r in recorder.requests), "no long-poll while the stream works"
    assert updates[-1].status == "succeeded" and updates[0].status in ("queued", "running")
    steps = [u.current_step for u in updates]
    assert steps == sorted(steps) and len({(u.status, u.current_step) for u in updates}) == len(updates)
    assert any(u.status == "running" for u in updates), [(u.status, u.current_step) for u in updates]


@LOCAL
def test_cancel_and_long_poll_fallback_with_304s(farm: Farm, client: Client, owner_key: str,
                                                 start_blocker: Callable[[], Job]) -> None:
    blocker = start_blocker()
    doomed = client.submit("never rendered", **TINY)
    target = client.submit("a cat", **{**TINY, "seed": 5})

    canceled = client.cancel(doomed.id)
    assert canceled.status == "canceled"
    assert client.cancel(doomed.id).status == "canceled", "canceling twice is not an error"
    assert client.wait(doomed.id).status == "canceled"
    with pytest.raises(JobFailed, match="canceled"):
        client.get(doomed.id).raise_for_status()

    recorder = Recorder(block_events=True)
    updates: list[Job] = []
    threading.Timer(1.5, client.cancel, args=(blocker.id,)).start()
    with Client(farm.base_url, owner_key, transport=recorder, poll_wait=0.3) as polling:
        job = polling.wait(target.id, on_progress=updates.append, timeout=120)
    assert job.status == "succeeded" and job.images
    assert ("GET", f"/v1/jobs/{target.id}/events", 404) in recorder.seen
    polls = [r for r in recorder.requests if r.url.path == f"/v1/jobs/{target.id}" and "wait" in r.url.params]
    assert polls and all(r.headers.get("If-None-Match") for r in polls), "every long-poll sends the last ETag"
    assert ("GET", f"/v1/jobs/{target.id}", 304) in recorder.seen, recorder.seen
    assert updates[0].status == "queued" and updates[-1].status == "succeeded"

    assert client.wait(blocker.id, timeout=60).status == "canceled"
    with pytest.raises(Conflict):
        client.cancel(target.id)


@pytest.mark.parametrize("farm", ["local", "s3"], indirect=True)
def test_download_images(farm: Farm, tmp_path: Path) -> None:
    with Client(farm.base_url, farm.admin_key) as client:
        job = client.generate("two boats", seed=3, batch_size=2, **TINY, timeout=120)
        paths = client.download_images(job, tmp_path / "out")
        assert [p.name for p in paths] == [f"{job.id}-0.png", f"{job.id}-1.png"]
        for path, image in zip(paths, job.images, strict=True):
            assert path.read_bytes() == httpx.get(image.url).content == client.download(image)
            assert read_png_text(path)["parameters"] == image.infotext
            assert Image.open(path).size == (64, 64)
        assert client.download_images(job.id, tmp_path / "again")[0].read_bytes() == paths[0].read_bytes()


@LOCAL
def test_422_names_the_field(client: Client) -> None:
    with pytest.raises(ValidationError) as raised:
        client.submit("a cat", steps=0)
    assert raised.value.status_code == 422 and raised.value.field == ("body", "steps")
    with pytest.raises(ValidationError) as raised:
        client.submit("a cat", model="no-such-model", **TINY)
    assert "model" in raised.value.field and "no-such-model" in str(raised.value)
    with pytest.raises(NotFound):
        client.get("00000000-0000-0000-0000-000000000000")


@LOCAL
def test_idempotency_keys(farm: Farm, owner_key: str) -> None:
    recorder = Recorder()
    with Client(farm.base_url, owner_key, transport=recorder) as client:
        first = client.submit("same", idempotency_key="order-42", **TINY)
        again = client.submit("same", idempotency_key="order-42", **TINY)
        assert again.id == first.id
        with pytest.raises(ValidationError):
            client.submit("another body", idempotency_key="order-42", **TINY)
        a, b = client.submit("twice", **TINY), client.submit("twice", **TINY)
        assert a.id != b.id, "a fresh key per call: two calls are two jobs"
        sent = [r.headers.get("Idempotency-Key") for r in recorder.requests if r.method == "POST"]
        assert sent[:3] == ["order-42"] * 3 and sent[3] and sent[4] and sent[3] != sent[4]
        for job in (first, a, b):
            client.wait(job.id, timeout=120)


@LOCAL
def test_upload_img2img_models_and_job_list(client: Client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, "PNG")
    upload = client.upload(buffer.getvalue(), "red.png")
    assert upload.ref == f"upload:{upload.id}" and (upload.width, upload.height) == (64, 64)
    job = client.generate("a red square", init_images=[upload.ref], denoising_strength=0.5, **TINY, timeout=120)
    assert job.status == "succeeded" and job.raw["mode"] == "img2img"

    models = client.models()
    assert [m.name for m in models] == ["demo-tiny"] and models[0].default
    assert all(lora.name for lora in client.loras())
    page = client.jobs(limit=200)
    assert job.id in [j.id for j in page.jobs] and page.total == len(page.jobs)
    assert all(j.status == "succeeded" for j in client.jobs(status="succeeded").jobs)


@LOCAL
def test_webhook_from_the_farm_verifies(client: Client) -> None:
    secret = client.webhook_secret()
    assert secret.startswith("whsec_")
    receiver = Receiver()
    receiver.secret = secret
    with receiver.running():
        job = client.generate("hooked", webhook_url=receiver.url("/hook"), **TINY, timeout=120)
        delivered = wait_until(lambda: receiver.received("/hook"), 60, message="the webhook")[0]
    payload = client.verify_webhook(delivered.body, delivered.headers, secret)
    assert payload["id"] == job.id and payload["event"] == "succeeded" and payload["status"] == "succeeded"
    with pytest.raises(WebhookVerificationFailed):
        verify_webhook(delivered.body.replace(b"succeeded", b"failed"), delivered.headers, secret)


@LOCAL
def test_async_client(farm: Farm, owner_key: str, tmp_path: Path) -> None:
    async def run() -> tuple[Job, list[Job], list[Path], Job]:
        updates: list[Job] = []
        async with AsyncClient(farm.base_url, owner_key, poll_wait=0.5) as client:
            submitted = await client.submit("async", seed=9, **TINY)
            job = await client.wait(submitted.id, on_progress=updates.append, timeout=120)
            paths = await client.download_images(job, tmp_path)
            polled = await client.wait((await client.submit("async poll", **TINY)).id, use_sse=False, timeout=120)
            return job, updates, paths, polled

    job, updates, paths, polled = asyncio.run(run())
    assert job.status == "succeeded" and job.seeds == [9]
    assert updates[-1].status == "succeeded"
    assert read_png_text(paths[0])["parameters"] == job.images[0].infotext
    assert polled.status == "succeeded"
