"""`/metrics` parses with Prometheus's own text parser, and its counters move when jobs run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from api.admin.metrics import Snapshot, families
from api.admin.metrics_rollup import increments
from tests.farm_harness import Farm, wait_until

TINY = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "seed": 7}


def scrape(farm: Farm) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}, through prometheus_client's parser."""
    with farm.client() as client:
        resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


class FixedCollector(Collector):
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        return families(self.snap)


def test_exposition_of_a_snapshot_parses() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    rows = [(None, "m.safetensors", "succeeded", None, t0, t0 + timedelta(seconds=s), t0 + timedelta(seconds=2 * s), 1,
             size, jobs) for s, size, jobs in ((0.2, 1, 1), (0.4, 3, 2), (1.5, 3, 2), (3, 8, 0), (7, 8, 0))]
    rows += [(None, "m.safetensors", "failed", "render_error", t0, None, t0, 0, None, 0)]
    snap = Snapshot(
        sources_up={"postgres": True, "redis": False},
        jobs_by_state={"queued": 2, "succeeded": 5},
        depth_by_model={("m.safetensors", "queued"): 2},
        counters=dict(increments(rows)),
        webhook_outcomes={"pending": 2, "delivered": 5, "failed": 1},
        workers=[("w1:12", 1.5, False, 4, 2.5), ("w2:13", 0.5, False, 0, None)],
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FixedCollector(snap))
    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert parsed["renderfarm_job_duration_seconds"].type == "histogram"
    buckets = [s for s in parsed["renderfarm_job_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 5
    assert [b.value for b in buckets[:4]] == [1, 2, 2, 3]  # le 0.25, 0.5, 1, 2: cumulative
    total = [s for s in parsed["renderfarm_job_duration_seconds"].samples if s.name.endswith("_sum")][0]
    assert total.value == pytest.approx(0.2 + 0.4 + 1.5 + 3 + 7)
    assert parsed["renderfarm_job_failures"].samples[0].labels == {"error_type": "render_error"}
    # A pending delivery has no outcome yet: it is a gauge, so the counter never falls.
    outcomes = {s.labels["outcome"]: s.value for s in parsed["renderfarm_webhook_deliveries"].samples}
    assert outcomes == {"delivered": 5, "failed": 1}
    assert parsed["renderfarm_webhook_deliveries_pending"].samples[0].value == 2
    sizes = {s.labels["le"]: s.value for s in parsed["renderfarm_batch_images"].samples if s.name.endswith("_bucket")}
    assert (sizes["1.0"], sizes["2.0"], sizes["4.0"], sizes["8.0"], sizes["+Inf"]) == (1, 1, 3, 5, 5)
    assert parsed["renderfarm_batches_formed"].samples[0].value == pytest.approx(2.0)  # a lone job + one batch of 2
    rates = {s.labels["worker"]: s.value for s in parsed["renderfarm_worker_images_per_second"].samples}
    assert rates == {"w1:12": 2.5}
    assert parsed["renderfarm_images_rendered"].type == "counter"
    assert parsed["renderfarm_images_rendered"].samples[0].name == "renderfarm_images_rendered_total"


@pytest.mark.e2e
@pytest.mark.parametrize("farm", ["local"], indirect=True)
def test_metrics_counters_move_when_a_job_runs(farm: Farm) -> None:
    before = scrape(farm)
    assert value(before, "renderfarm_metrics_source_up", source="postgres") == 1
    assert value(before, "renderfarm_metrics_source_up", source="redis") == 1
    assert value(before, "renderfarm_workers", state="alive") >= 1
    assert any(v >= 0 for v in before.get("renderfarm_worker_heartbeat_age_seconds", {}).values())

    job = farm.submit(TINY)
    done = farm.wait_for(job["id"])
    assert done["status"] == "succeeded", done
    model = done["model"]
    time.sleep(2.1)  # the collector caches a snapshot for 2 s

    def moved() -> dict | None:
        after = scrape(farm)
        grew = value(after, "renderfarm_images_rendered_total", model=model) == (
            value(before, "renderfarm_images_rendered_total", model=model) + 1)
        return after if grew else None

    after = wait_until(moved, 10, interval=0.5, message="images_rendered_total to grow")
    for name in ("renderfarm_job_duration_seconds_count", "renderfarm_job_queue_wait_seconds_count"):
        assert value(after, name, model=model) == value(before, name, model=model) + 1, name
    assert value(after, "renderfarm_job_duration_seconds_sum", model=model) > value(
        before, "renderfarm_job_duration_seconds_sum", model=model)
    assert value(after, "renderfarm_jobs", state="succeeded") == value(before, "renderfarm_jobs", state="succeeded") + 1
    assert "renderfarm_queue_depth" not in after or all(v >= 0 for v in after["renderfarm_queue_depth"].values())
    assert value(after, "renderfarm_queue_paused") == 0
    assert value(after, "renderfarm_broker_messages", kind="waiting") >= 0
    # The worker's succeed recorded the owner's usage (its quotas count from it), and /metrics shows it.
    owner_images = [sum(scraped.get("renderfarm_owner_images_total", {}).values()) for scraped in (before, after)]
    assert owner_images[1] == owner_images[0] + 1, owner_images


@pytest.mark.e2e
@pytest.mark.parametrize("farm", ["local"], indirect=True)
def test_celery_task_events_reach_the_broker_for_flower(farm: Farm) -> None:
    """Flower reads Celery's task events from the broker: the worker and the API must send them."""
    from celery import Celery

    probe = Celery("events-probe", broker=farm.env["REDIS_URL"])
    seen: list[str] = []
    succeeded = threading.Event()

    def on_event(event: dict) -> None:
        seen.append(event["type"])
        if event["type"] == "task-succeeded":
            succeeded.set()

    with probe.connection_for_read() as conn:
        receiver = probe.events.Receiver(conn, handlers={"*": on_event})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True)
        thread.start()
        time.sleep(1.0)  # subscribed: events are fanned out, none is kept for a late listener
        job = farm.submit(TINY | {"seed": 8})
        assert farm.wait_for(job["id"])["status"] == "succeeded"
        assert succeeded.wait(10), seen
        receiver.should_stop = True
    assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= set(seen)
