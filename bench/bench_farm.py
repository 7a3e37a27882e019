"""What every farm benchmark sets up the same way: a models folder and its own servers."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from shared.db.migrate import upgrade
from tests.farm_harness import ROOT

KEY = "rf_bench_admin_key_0123456789abcdefgh"


def models_folder(work: Path, checkpoint: Path | None) -> tuple[Path, Path]:
    """A WebUI-style models folder holding `checkpoint` (linked) or the demo model; returns (folder, file)."""
    models = work / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    if checkpoint:
        (models / "Stable-diffusion" / checkpoint.name).symlink_to(checkpoint.resolve())
    else:
        subprocess.run([sys.executable, "-m", "devtools.demo_models.sd15", str(models)], cwd=ROOT, check=True)
    return models, next((models / "Stable-diffusion").glob("*.safetensors"))


@dataclass
class BenchServers:
    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    env: dict[str, str]

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop()


def start_servers(work: Path, models: Path, threads: int) -> BenchServers:
    """PostgreSQL (migrated) and Redis of its own, and the environment the farm's processes run with."""
    os.environ["RENDERFARM_PG_FSYNC_OFF"] = "1"
    pg = EmbeddedPostgres(work / "pg", free_port()).start()
    rd = EmbeddedRedis(work / "redis", free_port(), persist=False).start()
    upgrade(pg.url)
    env = dict(os.environ, DATABASE_URL=pg.url, REDIS_URL=rd.url, STORAGE_URL=str(work / "objects"),
               RENDERFARM_MODELS_DIR=str(models), RENDERFARM_ADMIN_KEY=KEY, HF_HUB_OFFLINE="1",
               RENDERFARM_TORCH_THREADS=str(threads),
               # Benchmarks submit far faster than a person: a generous rate limit (60, then 10/s by default) and
               # queued cap (far above what that rate allows in a minute, so a submit skips its count as in
               # production: api/limits.py, `QueuedCounts`).
               RENDERFARM_DEFAULT_RATE_BURST="100000", RENDERFARM_DEFAULT_RATE_PER_SECOND="100000",
               RENDERFARM_DEFAULT_MAX_QUEUED="10000000")
    return BenchServers(pg, rd, env)
