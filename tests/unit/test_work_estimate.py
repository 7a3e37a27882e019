"""The arithmetic of queued work: decayed render history, seconds per step, steps per job, work per model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.admin import autoscaling
from api.admin.metrics_rollup import render_observations
from api.admin.work_estimate import (
    DEFAULT_SECONDS_PER_STEP,
    HISTORY_DECAY,
    SECONDS_COUNTER,
    STEPS_COUNTER,
    RenderHistory,
    fold,
    histories_from_counters,
    job_steps,
    queued_work_seconds,
    step_cost,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_model_without_history_uses_the_default() -> None:
    assert step_cost(None).seconds_per_step == DEFAULT_SECONDS_PER_STEP
    assert not step_cost(None).from_history
    assert not step_cost(RenderHistory(0.0, 0.0)).from_history
    assert step_cost(None, default=0.1).seconds_per_step == 0.1


def test_history_is_the_ratio_of_decayed_sums() -> None:
    history = fold({}, [("m", 2.0, 20)])["m"]
    assert (history.seconds, history.steps) == (2.0, 20)
    cost = step_cost(history)
    assert cost.from_history and cost.seconds_per_step == pytest.approx(0.1)
    # The next job weighs 1, the first HISTORY_DECAY.
    history = fold({"m": history}, [("m", 12.0, 40)])["m"]
    assert history.seconds == pytest.approx(2.0 * HISTORY_DECAY + 12.0)
    assert history.steps == pytest.approx(20 * HISTORY_DECAY + 40)


def test_a_long_cheap_job_is_not_outweighed_by_a_short_probe() -> None:
    """Weighted by steps: a 2-step job that took 1 s (overhead) barely moves a 50-step job's 0.1 s per step."""
    history = fold({}, [("m", 5.0, 50), ("m", 1.0, 2)])["m"]
    assert step_cost(history).seconds_per_step < 0.13  # the mean of the two ratios would say 0.3


def test_history_follows_recent_jobs() -> None:
    """After a move to a GPU twice as fast, the estimate approaches the new speed within a few dozen jobs."""
    history = fold({}, [("m", 10.0, 20)] * 100)["m"]
    assert step_cost(history).seconds_per_step == pytest.approx(0.5)
    history = fold({"m": history}, [("m", 5.0, 20)] * 60)["m"]
    assert step_cost(history).seconds_per_step == pytest.approx(0.25, rel=0.05)


def test_fold_skips_jobs_that_say_nothing_and_keeps_models_apart() -> None:
    changed = fold({"b": RenderHistory(1.0, 10.0)}, [("a", 0.0, 20), ("a", 3.0, 0), ("b", 1.0, 10)])
    assert set(changed) == {"b"}  # "a" had neither time nor steps
    assert changed["b"].steps == pytest.approx(10 * HISTORY_DECAY + 10)


def test_histories_round_trip_through_the_counters() -> None:
    counters = {(SECONDS_COUNTER, "m", ""): 3.0, (STEPS_COUNTER, "m", ""): 30.0, ("images", "m", ""): 7.0}
    assert histories_from_counters(counters) == {"m": RenderHistory(3.0, 30.0)}


@pytest.mark.parametrize(("plan", "steps"), [
    ({"steps": 20}, 20),
    ({"steps": 20, "n_iter": 3}, 60),
    ({"mode": "img2img", "steps": 20, "denoising_strength": 0.5}, 11),  # the WebUI runs int(0.5 * 20) + 1
    ({"mode": "txt2img", "steps": 20, "enable_hr": True}, 40),
    ({"mode": "txt2img", "steps": 20, "enable_hr": True, "hr_second_pass_steps": 5, "n_iter": 2}, 50),
    ({"mode": "upscale"}, 0),
    ({}, 0),
    (None, 0),
])
def test_job_steps(plan: dict | None, steps: int) -> None:
    assert job_steps(plan) == steps


def test_queued_work_is_steps_times_seconds_per_step() -> None:
    costs = {"a": step_cost(RenderHistory(1.0, 10.0))}
    work = queued_work_seconds({"a": 300, "b": 8}, costs)
    assert work["a"] == pytest.approx(30.0)
    assert work["b"] == pytest.approx(8 * DEFAULT_SECONDS_PER_STEP)


def test_rollup_rows_give_succeeded_jobs_render_time_and_steps() -> None:
    def row(status: str, render: float | None, plan: dict | None) -> tuple:
        return (None, "m", status, None, T0, T0, T0, 1, 1, 1, render, plan)

    rows = [row("succeeded", 2.5, {"steps": 25}), row("failed", None, {"steps": 25}),
            row("succeeded", None, {"steps": 25}), row("canceled", 1.0, {"steps": 25})]
    assert render_observations(rows) == [("m", 2.5, 25)]
    assert render_observations([(None, "m", "succeeded", None, T0, T0, T0, 1)]) == []  # rows of old tests


def test_summarize_counts_routes_and_steps() -> None:
    rows = [
        ("render", "a", {"steps": 20}, 3, T0 - timedelta(seconds=30)),
        ("render", "b", {"steps": 10, "n_iter": 2}, 1, T0 - timedelta(seconds=90)),
        ("render.m.0123", "a", {"steps": 20}, 2, T0 - timedelta(seconds=5)),
        (None, "a", {"steps": 4}, 1, T0),
    ]
    work = autoscaling.summarize(rows, now=T0)
    assert {r: q.queued for r, q in work.routes.items()} == {"render": 4, "render.m.0123": 2, "unrouted": 1}
    assert work.route_ages() == {"render": 90.0, "render.m.0123": 5.0, "unrouted": 0.0}
    assert work.steps_by_model == {"a": 3 * 20 + 2 * 20 + 4, "b": 20}


def test_worker_activity_from_heartbeats() -> None:
    infos = [{"ready": True, "current_job": "j1"}, {"ready": True, "current_job": None, "current_batch": ["j2"]},
             {"ready": True, "current_job": None, "current_batch": []}, {"ready": False}]
    assert autoscaling.worker_activity(infos) == autoscaling.WorkerActivity(busy=2, idle=1, starting=1)


def test_autoscaling_families_parse() -> None:
    work = autoscaling.summarize([("render", "a", {"steps": 20}, 3, T0 - timedelta(seconds=30))], now=T0)
    counters = {(SECONDS_COUNTER, "a", ""): 1.0, (STEPS_COUNTER, "a", ""): 20.0,
                (SECONDS_COUNTER, "old", ""): 4.0, (STEPS_COUNTER, "old", ""): 20.0}

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return autoscaling.families(work, autoscaling.WorkerActivity(busy=2, idle=1), counters)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert "# HELP renderfarm_queued_work_seconds" in text and "# TYPE renderfarm_queued_work_seconds gauge" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("renderfarm_route_queued_jobs", (("route", "render"),))] == 3
    assert samples[("renderfarm_route_oldest_queued_job_age_seconds", (("route", "render"),))] == 30
    assert samples[("renderfarm_queued_steps", (("model", "a"),))] == 60
    assert samples[("renderfarm_queued_work_seconds", (("model", "a"),))] == pytest.approx(3.0)  # 60 x 0.05
    assert samples[("renderfarm_seconds_per_step", (("model", "old"), ("source", "history")))] == pytest.approx(0.2)
    assert samples[("renderfarm_workers_busy", ())] == 2 and samples[("renderfarm_workers_idle", ())] == 1
    # A source that failed this scrape: its families are left out, not reported as an empty queue.
    assert list(autoscaling.families(None, None, counters)) == []
