"""Per-owner usage for `/metrics` (issue 17): what each owner's finished jobs used, as running totals and as
today's and this month's (UTC) figures, and each owner's queued jobs.

Read from `owner_usage` at scrape time like the rest of the farm's metrics (api/admin/metrics.py), so every API
replica reports the same values and a restart loses nothing. One label, `owner`: one series per owner that used
the farm this month or has jobs queued (counters: since usage was first recorded).
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db.models import Job
from shared.owners.usage import totals_by_owner, used_by_owner


def owner_usage_metrics(session: Session, now: datetime) -> list[Metric]:
    """Three small aggregate queries: all-time totals, this month's rows, queued jobs per owner."""
    totals, recent = totals_by_owner(session), used_by_owner(session, now)
    queued = {owner: int(count) for owner, count in session.execute(
        select(Job.owner, func.count()).where(Job.status == "queued").group_by(Job.owner))}

    gpu_total = CounterMetricFamily("renderfarm_owner_gpu_seconds", "Measured render seconds of an owner's "
                                    "finished jobs (failed and canceled ones included)", labels=["owner"])
    images_total = CounterMetricFamily("renderfarm_owner_images", "Images of an owner's succeeded jobs",
                                       labels=["owner"])
    jobs_total = CounterMetricFamily("renderfarm_owner_jobs_succeeded", "An owner's succeeded jobs", labels=["owner"])
    for owner, used in sorted(totals.items()):
        gpu_total.add_metric([owner], used.gpu_seconds)
        images_total.add_metric([owner], used.images)
        jobs_total.add_metric([owner], used.jobs)

    families: list[Metric] = [gpu_total, images_total, jobs_total]
    for period, index in (("today", 0), ("month", 1)):
        gpu = GaugeMetricFamily(f"renderfarm_owner_gpu_seconds_{period}",
                                f"Render seconds an owner used {'today' if index == 0 else 'this month'} (UTC)",
                                labels=["owner"])
        images = GaugeMetricFamily(f"renderfarm_owner_images_{period}",
                                   f"Images an owner rendered {'today' if index == 0 else 'this month'} (UTC)",
                                   labels=["owner"])
        for owner, pair in sorted(recent.items()):
            gpu.add_metric([owner], pair[index].gpu_seconds)
            images.add_metric([owner], pair[index].images)
        families += [gpu, images]

    waiting = GaugeMetricFamily("renderfarm_owner_queued_jobs", "An owner's jobs queued now", labels=["owner"])
    for owner, count in sorted(queued.items()):
        waiting.add_metric([owner], count)
    families.append(waiting)
    return families
