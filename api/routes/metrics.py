"""`GET /metrics` in Prometheus text format (see api/admin/metrics.py for where the numbers come from).

It needs an admin API key like the other admin routes (Prometheus sends one with
`authorization: {credentials_file: ...}` in its scrape config), unless
RENDERFARM_METRICS_PUBLIC=true says the scrape network is private.
"""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from api.admin.metrics import FarmCollector, farm_registry
from api.deps import SessionDep, require_admin, require_key
from shared.db.session import get_session_factory
from shared.queueing.fleet import get_redis, lost_after
from shared.settings import get_settings

router = APIRouter(tags=["metrics"])


@lru_cache
def get_registry() -> CollectorRegistry:
    collector = FarmCollector(
        get_session_factory(), get_redis, lost_after_seconds=lost_after(get_settings()),
        forget_after_seconds=get_settings().admin.forget_lost_worker_seconds,
    )
    return farm_registry(collector)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition format"}},
)
def metrics(request: Request, session: SessionDep) -> Response:
    """Jobs by state, queue depth per model and per route, queued work, job duration and queue wait histograms,
    images, failures, workers (busy and idle)."""
    if not get_settings().admin.metrics_public:
        require_admin(require_key(request, session))
    return Response(generate_latest(get_registry()), media_type=CONTENT_TYPE_LATEST)
