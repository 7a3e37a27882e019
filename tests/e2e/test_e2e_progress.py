"""Progress, queue position and the Server-Sent Events stream of a job."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.farm_harness import Farm, wait_until

pytestmark = pytest.mark.e2e

LONG = {"prompt": "progress", "width": 256, "height": 256, "steps": 60, "sampler_name": "Euler"}


def read_events(farm: Farm, job_id: str, last_event_id: str | None = None) -> list[tuple[str, str, dict]]:
    headers = {"Authorization": f"Bearer {farm.admin_key}"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    events, current = [], {}
    with httpx.stream("GET", f"{farm.base_url}/v1/jobs/{job_id}/events", headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                if current:
                    events.append((current["id"], current["event"], json.loads(current["data"])))
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return events


def test_progress_queue_position_and_event_stream(farm: Farm) -> None:
    first = farm.submit(LONG)
    second = farm.submit({"prompt": "behind", "width": 64, "height": 64, "steps": 2})
    with farm.client() as c:
        wait_until(lambda: c.get(f"/v1/jobs/{first['id']}").json()["status"] == "running", 60,
                   message="first job to run")
        # Next in line. Other owners' part of a fair position comes from a queue snapshot up to
        # RENDERFARM_QUEUE_POSITION_REFRESH_SECONDS (1 s) old: jobs other tests had queued a moment ago may show
        # for that long.
        queued = wait_until(lambda: (job := c.get(f"/v1/jobs/{second['id']}").json())["queue_position"] == 1 and job,
                            5, message="the queued job's position to be 1")
        assert queued["status"] == "queued"
        assert queued["total_steps"] == 2

        def some_progress() -> dict | None:
            job = c.get(f"/v1/jobs/{first['id']}").json()
            return job if 0 < job["progress"] < 1 or job["status"] == "succeeded" else None

        job = wait_until(some_progress, 90, message="progress on the first job")
        if job["status"] == "running":
            assert 0 < job["current_step"] < job["total_steps"] == 60
            assert job["eta_seconds"] is not None and job["eta_seconds"] >= 0

    events = read_events(farm, first["id"])
    assert events[-1][1] == "succeeded"
    assert events[-1][2]["status"] == "succeeded" and len(events[-1][2]["images"]) == 1
    ids = [tuple(map(int, e[0].split("."))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # Resuming after the last event gives nothing new; resuming earlier replays only the newer state.
    assert read_events(farm, first["id"], last_event_id=events[-1][0]) == []
    resumed = read_events(farm, first["id"], last_event_id="1.0")
    assert [e[1] for e in resumed] == ["succeeded"]
    farm.wait_for(second["id"])
