"""Cancel: a queued job never renders; a running job stops at its next step; terminal jobs are a 409."""

from __future__ import annotations

import pytest

from tests.farm_harness import Farm, wait_until

pytestmark = pytest.mark.e2e

LONG = {"prompt": "a long render", "width": 256, "height": 256, "steps": 150, "sampler_name": "Euler"}


def test_cancel_queued_and_running_jobs(farm: Farm) -> None:
    running = farm.submit(LONG)
    queued = farm.submit({"prompt": "waits behind", "width": 64, "height": 64, "steps": 2})
    with farm.client() as c:
        wait_until(lambda: c.get(f"/v1/jobs/{running['id']}").json()["status"] == "running", 60,
                   message="the long job to start")
        resp = c.post(f"/v1/jobs/{queued['id']}/cancel")
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "canceled"

        resp = c.post(f"/v1/jobs/{running['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] in ("running", "canceled")
        job = farm.wait_for(running["id"], timeout=60)
        assert job["status"] == "canceled"
        assert job["images"] == []
        assert job["progress"] < 1.0

        again = c.post(f"/v1/jobs/{running['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "canceled"

        # The canceled queued job never renders, even though its message is still delivered.
        after = farm.wait_for(farm.submit({"prompt": "after", "width": 64, "height": 64, "steps": 2})["id"])
        assert after["status"] == "succeeded"
        never = c.get(f"/v1/jobs/{queued['id']}").json()
        assert never["status"] == "canceled" and never["started_at"] is None and never["images"] == []

        assert c.post(f"/v1/jobs/{after['id']}/cancel").status_code == 409
        assert c.post("/v1/jobs/00000000-0000-0000-0000-000000000000/cancel").status_code == 404
