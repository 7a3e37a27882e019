"""The admin dashboard's queries on a jobs table of 100,000 rows: each must answer in under 100 ms.

Starts its own PostgreSQL and Redis (the embedded servers `make up` uses), migrates, loads
synthetic jobs with COPY (a week of history, a deep queue, failures, one image per
succeeded job, two days of queue samples), then times every query the dashboard and
/metrics run, and every admin route end to end through the ASGI app: the median and
95th percentile of `--repeat` runs after a warm-up. With `--compare` it drops the
indexes migration 0003 added and times the queries again, to show what they buy.

    .venv/bin/python -m bench.admin_queries --jobs 100000 --repeat 30 --compare
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from sqlalchemy import text as sa_text

from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

if TYPE_CHECKING:
    import redis
    from fastapi import FastAPI
    from sqlalchemy.orm import Session, sessionmaker

KEY = "rf_bench_admin_key_0123456789abcdefgh"
MODELS = [f"model-{i}.safetensors" for i in range(8)]
ERRORS = ["render_error", "storage_error", "worker_lost", "invalid_input"]
NEW_INDEXES = {"ix_jobs_created_at": "jobs (created_at)", "ix_jobs_finished_at": "jobs (finished_at)",
               "ix_job_images_created_at": "job_images (created_at)"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}"


def load(conn: psycopg.Connection, jobs: int, now: datetime, seed: int = 1) -> dict[str, int]:
    """Synthetic history: created uniformly over 7 days; 5 % queued, 0.1 % running, the rest finished."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    images: list[tuple[uuid.UUID, datetime]] = []
    week = 7 * 24 * 3600
    with conn.cursor().copy(
        "COPY jobs (id, owner, mode, status, status_seq, params, model_name, seed, attempt, max_attempts, progress, "
        "error_type, error_message, created_at, started_at, finished_at, updated_at, published_at) FROM STDIN"
    ) as copy:
        for i in range(jobs):
            job_id = uuid.UUID(int=rng.getrandbits(128))
            created = now - timedelta(seconds=rng.random() * week)
            roll = rng.random()
            status = ("queued" if roll < 0.05 else "running" if roll < 0.051 else "failed" if roll < 0.10
                      else "canceled" if roll < 0.12 else "succeeded")
            if status == "queued":  # a queue is recent: these were created in the last hour
                created = now - timedelta(seconds=rng.random() * 3600)
            started = created + timedelta(seconds=rng.expovariate(1 / 20)) if status != "queued" else None
            finished = (started + timedelta(seconds=1 + rng.expovariate(1 / 4))
                        if started and status != "running" else None)
            if finished and finished > now:
                finished = now
            error = rng.choice(ERRORS) if status == "failed" else None
            copy.write_row((
                job_id, f"user-{i % 500}", "txt2img", status, 3, '{"prompt": "a synthetic job", "seed": 1}',
                MODELS[i % len(MODELS)], i, 1, 3, 1.0 if finished else 0.0, error,
                "synthetic failure" if error else None, created, started, finished, finished or created, created,
            ))
            counts[status] = counts.get(status, 0) + 1
            if status == "succeeded":
                images.append((job_id, finished))
    with conn.cursor().copy(
        "COPY job_images (job_id, index, key, seed, width, height, infotext, created_at) FROM STDIN"
    ) as copy:
        for job_id, finished in images:
            copy.write_row((job_id, 0, f"jobs/{job_id}/0.png", 1, 512, 512, "a synthetic job", finished))
    with conn.cursor().copy("COPY queue_samples (sampled_at, queued, running, broker_waiting, workers_alive) "
                            "FROM STDIN") as copy:
        start = int((now - timedelta(hours=48)).timestamp()) // 10 * 10
        for t in range(start, int(now.timestamp()), 10):
            copy.write_row((datetime.fromtimestamp(t, UTC), rng.randint(0, 5000), rng.randint(0, 16),
                            rng.randint(0, 5000), 16))
    counts["images"] = len(images)
    return counts


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm-up: plans cached, pages in memory, as on a dashboard that refreshes every few seconds
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.95))]


def query_cases(session_factory: sessionmaker[Session], client: redis.Redis) -> dict[str, Callable[[], object]]:
    from api.admin import autoscaling, metrics, metrics_rollup
    from api.admin import queries as admin_queries
    from shared.queueing.farm_state import get_pause_state

    def run(fn: Callable[[Session], object]) -> Callable[[], object]:
        def call() -> object:
            with session_factory() as session:
                return fn(session)
        return call

    now = datetime.now(UTC)
    hour, day = now - timedelta(hours=1), now - timedelta(hours=24)
    return {
        "queue_depth (queued/running per model, oldest)": run(admin_queries.queue_depth),
        "pause flag": run(get_pause_state),
        "recent_jobs (25, with images)": run(lambda s: [j.images for j in admin_queries.recent_jobs(s, limit=25)]),
        "recent_jobs status=failed (25)": run(lambda s: admin_queries.recent_jobs(s, limit=25, status="failed")),
        "throughput_series 1h / 60 s": run(lambda s: admin_queries.throughput_series(s, hour, now, 60)),
        "throughput_series 24h / 24 min": run(lambda s: admin_queries.throughput_series(s, day, now, 1440)),
        "queue_series 1h / 10 s": run(lambda s: admin_queries.queue_series(s, hour, now, 10)),
        "queue_series 24h / 240 s": run(lambda s: admin_queries.queue_series(s, day, now, 240)),
        "finished_counts 1h": run(lambda s: admin_queries.finished_counts(s, hour)),
        "finished_counts 24h": run(lambda s: admin_queries.finished_counts(s, day)),
        "timing_percentiles 1h (render time, queue wait)": run(lambda s: admin_queries.timing_percentiles(s, hour)),
        "timing_percentiles 24h": run(lambda s: admin_queries.timing_percentiles(s, day)),
        "metrics: jobs_by_state (live count)": run(metrics.jobs_by_state),
        "metrics: rollup pass, 20 jobs newly finished": run(lambda s: finish_some(s, 20)),
        "metrics: read counters": run(metrics_rollup.read_counters),
        "metrics: queued jobs per route, steps per model (autoscaling)": run(autoscaling.read_queued_work),
        "metrics: whole snapshot (Postgres + Redis)": run(lambda s: metrics.take_snapshot(
            s, client, lost_after_seconds=45, forget_after_seconds=3600)),
    }


def finish_some(session: Session, count: int) -> int:
    """Mark `count` queued jobs succeeded now, then run one rollup pass (what a scrape does after new work)."""
    from api.admin import metrics_rollup

    session.execute(sa_text(
        "UPDATE jobs SET status = 'succeeded', started_at = now() - interval '3 s', finished_at = now() "
        "WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' LIMIT :n)"), {"n": count})
    counted = metrics_rollup.advance(session)
    session.commit()
    return counted


def route_cases(app: FastAPI) -> dict[str, Callable[[], object]]:
    from fastapi.testclient import TestClient

    client = TestClient(app)
    client.__enter__()
    headers = {"Authorization": f"Bearer {KEY}"}

    def get(path: str) -> Callable[[], object]:
        def call() -> object:
            resp = client.get(path, headers=headers)
            assert resp.status_code == 200, resp.text
            return resp
        return call

    from api.routes.metrics import get_registry

    def scrape() -> object:
        get_registry.cache_clear()  # no 2 s snapshot cache: time the full work of a scrape
        return get("/metrics")()

    return {
        "GET /v1/admin/queue": get("/v1/admin/queue"),
        "GET /v1/admin/workers (16 workers)": get("/v1/admin/workers"),
        "GET /v1/admin/stats?window=1h": get("/v1/admin/stats?window=1h"),
        "GET /v1/admin/stats?window=24h": get("/v1/admin/stats?window=24h"),
        "GET /v1/admin/jobs?limit=25": get("/v1/admin/jobs?limit=25"),
        "GET /metrics (uncached)": scrape,
    }


def fake_workers(client: redis.Redis, count: int) -> None:
    import json

    from shared.queueing.fleet import WORKER_KEY_PREFIX

    for i in range(count):
        info = {"name": f"gpu-{i}:100{i}", "pid": 1000 + i, "device": "cuda:0", "models": MODELS[:2],
                "ready": True, "current_job": None, "jobs_done": i, "heartbeat_at": time.time()}
        client.set(WORKER_KEY_PREFIX + info["name"], json.dumps(info), ex=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--compare", action="store_true", help="also time the queries without 0003's indexes")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-admin-"))
    os.environ["RENDERFARM_PG_FSYNC_OFF"] = "1"
    pg = EmbeddedPostgres(work / "pg", free_port()).start()
    rd = EmbeddedRedis(work / "redis", free_port(), persist=False).start()
    try:
        os.environ.update(DATABASE_URL=pg.url, REDIS_URL=rd.url, STORAGE_URL=str(work / "objects"),
                          RENDERFARM_ADMIN_KEY=KEY, RENDERFARM_SAMPLE_SECONDS="0", RENDERFARM_MODELS_DIR=str(work))
        from shared.db.migrate import upgrade

        upgrade(pg.url)
        conninfo = pg.url.replace("postgresql+psycopg://", "postgresql://")
        started = time.perf_counter()
        with psycopg.connect(conninfo) as conn:
            counts = load(conn, args.jobs, datetime.now(UTC))
            conn.commit()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            version = conn.execute("SHOW server_version").fetchone()[0]
        print(f"loaded {args.jobs} jobs in {time.perf_counter() - started:.1f}s: {counts}", file=sys.stderr)

        from api.main import create_app
        from shared.db.session import get_session_factory
        from shared.queueing.fleet import get_redis

        fake_workers(get_redis(), 16)
        from api.admin import metrics_rollup

        started = time.perf_counter()
        with get_session_factory()() as session:
            while metrics_rollup.advance(session, batches=1):
                session.commit()
            session.commit()
        backfill = time.perf_counter() - started
        cases = query_cases(get_session_factory(), get_redis()) | route_cases(create_app())
        results = {name: timed(fn, args.repeat) for name, fn in cases.items()}
        without: dict[str, tuple[float, float]] = {}
        if args.compare:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                for index in NEW_INDEXES:
                    conn.execute(f"DROP INDEX {index}")
                conn.execute("ANALYZE")
            without = {name: timed(fn, max(5, args.repeat // 3)) for name, fn in cases.items()}

        print(f"\nAdmin queries, {args.jobs:,} jobs ({counts.get('queued', 0):,} queued, {counts['images']:,} images), "
              f"PostgreSQL {version}, median of {args.repeat} after a warm-up")
        print(f"Machine: {machine()}")
        print(f"First metrics rollup over all {args.jobs:,} jobs (once, after an upgrade): {backfill:.1f} s "
              f"in passes of {metrics_rollup.BATCH}\n")
        header = "| query | median ms | p95 ms |" + (" median ms without 0003 indexes |" if without else "")
        print(header)
        print("|---|---:|---:|" + ("---:|" if without else ""))
        for name, (median, p95) in results.items():
            extra = f" {without[name][0]:.1f} |" if without else ""
            flag = " **over 100 ms**" if median >= 100 else ""
            print(f"| {name}{flag} | {median:.1f} | {p95:.1f} |{extra}")
    finally:
        rd.stop()
        pg.stop()


if __name__ == "__main__":
    main()
