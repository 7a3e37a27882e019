"""Webhooks through the whole farm: a user submits with webhook_url and a real receiver hears every event."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.farm_harness import Farm, wait_until
from tests.webhook_receiver import Receiver, Reply

pytestmark = pytest.mark.e2e


@pytest.fixture
def receiver(farm: Farm) -> Iterator[Receiver]:
    with Receiver().running() as r:
        with farm.client() as c:
            r.secret = c.get("/v1/webhook-secret").json()["secret"]
        yield r


def test_lifecycle_events_reach_a_verifying_receiver(farm: Farm, receiver: Receiver) -> None:
    receiver.script("/first-fails", Reply(500), Reply(200))
    job = farm.submit({"prompt": "hooked", "width": 64, "height": 64, "steps": 2, "seed": 9,
                       "webhook_url": receiver.url("/first-fails"),
                       "webhook_events": ["queued", "started", "succeeded"]})
    done = farm.wait_for(job["id"])
    assert done["status"] == "succeeded"

    def events() -> list[dict]:
        return [json.loads(r.body) for r in receiver.received("/first-fails") if r.verified]

    # Deliveries are not ordered across events (one may be in its retry); receivers order by `sequence`.
    wait_until(lambda: {e["event"] for e in events()} == {"queued", "started", "succeeded"}, 60,
               message="all three events")
    got = events()
    names = [e["event"] for e in got]
    assert set(names) == {"queued", "started", "succeeded"}
    assert all(r.verified for r in receiver.received("/first-fails")), "every delivery verifies"
    # One event id per event, reused by the retry after the first 500.
    ids_by_event: dict[str, set[str]] = {}
    for r in receiver.received("/first-fails"):
        ids_by_event.setdefault(json.loads(r.body)["event"], set()).add(r.headers["webhook-id"])
    assert all(len(ids) == 1 for ids in ids_by_event.values()), ids_by_event
    final = next(e for e in got if e["event"] == "succeeded")
    assert final["id"] == job["id"] and final["status"] == "succeeded"
    assert [img["seed"] for img in final["images"]] == [9]
    assert final["images"][0]["url"].startswith("http")
    sequences = sorted({e["sequence"] for e in got})
    assert sequences == list(range(1, len(sequences) + 1))

    with farm.client() as c:
        listing = c.get(f"/v1/jobs/{job['id']}/webhooks")
    assert listing.status_code == 200


def test_default_events_are_the_terminal_ones(farm: Farm, receiver: Receiver) -> None:
    receiver.script("/default", Reply(200))
    job = farm.submit({"prompt": "default hook", "width": 64, "height": 64, "steps": 2,
                       "webhook_url": receiver.url("/default")})
    farm.wait_for(job["id"])
    wait_until(lambda: receiver.received("/default"), 60, message="the terminal event")
    assert [json.loads(r.body)["event"] for r in receiver.received("/default")] == ["succeeded"]
