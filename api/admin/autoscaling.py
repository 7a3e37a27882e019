"""What an autoscaler reads from `/metrics`: queued jobs and their age per route, busy and idle workers, and
seconds of queued work per model (see `api.admin.work_estimate` for the estimate).

One query walks the queued rows (ix_jobs_status_created: the cost follows the queue, not the table) and
groups them by route, model and the few params that decide a job's steps, so a queue of thousands of alike
jobs comes back as a handful of rows. Workers come from the heartbeats `/metrics` already reads, and the
seconds per step from the counters it already reads: nothing else is asked of Postgres or Redis.

deploy/k8s/base/worker-scaledobject.yaml scales the GPU workers on `renderfarm_queued_work_seconds`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.admin.work_estimate import (
    PLAN_SQL,
    StepCost,
    histories_from_counters,
    job_steps,
    queued_work_seconds,
    step_cost,
)

UNROUTED = "unrouted"  # a queued job whose message was never published (the label of a NULL route)

_QUEUED = text(
    f"SELECT j.route, j.model_name, {PLAN_SQL} AS plan, count(*), min(j.created_at) "
    "FROM jobs j WHERE j.status = 'queued' GROUP BY 1, 2, 3"
)


@dataclass
class RouteQueue:
    queued: int = 0
    oldest_created_at: datetime | None = None


@dataclass
class QueuedWork:
    """The queued jobs, per route and per model (counts and planned steps)."""

    routes: dict[str, RouteQueue] = field(default_factory=dict)
    steps_by_model: dict[str, int] = field(default_factory=dict)
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def route_ages(self) -> dict[str, float]:
        return {route: max(0.0, (self.read_at - q.oldest_created_at).total_seconds()) if q.oldest_created_at else 0.0
                for route, q in self.routes.items()}


@dataclass(frozen=True)
class WorkerActivity:
    busy: int = 0  # holding a job or a batch now
    idle: int = 0  # ready, holding nothing: the fleet's spare capacity
    starting: int = 0  # alive but still loading its models


def summarize(rows: Iterable[tuple[Any, ...]], now: datetime | None = None) -> QueuedWork:
    """Fold the query's rows (route, model, plan, count, oldest created) into per-route and per-model totals."""
    work = QueuedWork(read_at=now or datetime.now(UTC))
    steps: defaultdict[str, int] = defaultdict(int)
    for route, model, plan, count, oldest in rows:
        entry = work.routes.setdefault(route or UNROUTED, RouteQueue())
        entry.queued += int(count)
        if oldest is not None and (entry.oldest_created_at is None or oldest < entry.oldest_created_at):
            entry.oldest_created_at = oldest
        steps[model] += job_steps(plan) * int(count)
    work.steps_by_model = dict(steps)
    return work


def read_queued_work(session: Session, now: datetime | None = None) -> QueuedWork:
    return summarize(session.execute(_QUEUED).all(), now)


def worker_activity(infos: Iterable[dict[str, Any]]) -> WorkerActivity:
    """Busy, idle and starting among live workers' heartbeats (worker/runtime.py `describe`)."""
    busy = idle = starting = 0
    for info in infos:
        if info.get("current_job") or info.get("current_batch"):
            busy += 1
        elif info.get("ready"):
            idle += 1
        else:
            starting += 1
    return WorkerActivity(busy=busy, idle=idle, starting=starting)


def step_costs(counters: Mapping[tuple[str, str, str], float], models: Iterable[str]) -> dict[str, StepCost]:
    """Seconds per step of `models` and of every model with history."""
    histories = histories_from_counters(counters)
    return {model: step_cost(histories.get(model)) for model in set(models) | histories.keys()}


def families(work: QueuedWork | None, activity: WorkerActivity | None,
             counters: Mapping[tuple[str, str, str], float]) -> Iterator[Metric]:
    """The autoscaling families; a family whose source failed this scrape is left out rather than reported as 0."""
    if work is not None:
        queued = GaugeMetricFamily("renderfarm_route_queued_jobs", "Queued jobs per broker route (the shared "
                                   "`render` queue, `render.m.<digest>` per model)", labels=["route"])
        ages = GaugeMetricFamily("renderfarm_route_oldest_queued_job_age_seconds",
                                 "Age of the oldest queued job per broker route", labels=["route"])
        route_ages = work.route_ages()
        for route, entry in sorted(work.routes.items()):
            queued.add_metric([route], entry.queued)
            ages.add_metric([route], round(route_ages[route], 3))
        yield queued
        yield ages
        costs = step_costs(counters, work.steps_by_model)
        steps = GaugeMetricFamily("renderfarm_queued_steps", "Planned sampling steps of the queued jobs per model",
                                  labels=["model"])
        seconds = GaugeMetricFamily("renderfarm_queued_work_seconds", "Estimated seconds one worker needs for the "
                                    "queued jobs per model (queued steps x seconds per step)", labels=["model"])
        for model, total in sorted(queued_work_seconds(work.steps_by_model, costs).items()):
            steps.add_metric([model], work.steps_by_model[model])
            seconds.add_metric([model], round(total, 3))
        yield steps
        yield seconds
        per_step = GaugeMetricFamily("renderfarm_seconds_per_step", "Estimated render seconds per sampling step "
                                     "(source: history of recent jobs, or the default)", labels=["model", "source"])
        for model, cost in sorted(costs.items()):
            per_step.add_metric([model, "history" if cost.from_history else "default"],
                                round(cost.seconds_per_step, 6))
        yield per_step
    if activity is not None:
        yield GaugeMetricFamily("renderfarm_workers_busy", "Live render workers holding a job", value=activity.busy)
        yield GaugeMetricFamily("renderfarm_workers_idle", "Live render workers ready and holding no job",
                                value=activity.idle)
        yield GaugeMetricFamily("renderfarm_workers_starting", "Live render workers still loading their models",
                                value=activity.starting)
