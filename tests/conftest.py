"""Fixtures that start real servers: PostgreSQL, Redis, an S3-compatible server, and our processes."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from devtools.demo_models import DEMO_BUILDERS
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from tests.farm_harness import ROOT, Farm, start_api, start_webhook_worker, start_worker, wait_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RENDERFARM_PG_FSYNC_OFF", "1")

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "integration", "e2e")  # tests/<kind>/..., each a marker: `pytest -m unit`, `-m "not e2e"`
REDIS_DATABASES = 128  # handed out one per user by `redis_db_url`, never named by hand


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its kind, taken from the folder it lives in."""
    for item in items:
        path = item.path.resolve()
        parts = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
        if len(parts) > 1 and parts[0] in KINDS:
            item.add_marker(parts[0])


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core box two spinning OpenMP threads made a
    64px render ~100x slower (0.07 s -> 11 s). Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def postgres(servers_dir: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(servers_dir / "pg", free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(servers_dir: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(servers_dir / "redis", free_port(), persist=False, databases=REDIS_DATABASES).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_db_url(redis_server: EmbeddedRedis) -> Callable[[], str]:
    """A factory: each call returns the URL of a Redis database no other caller in this session was given
    (database 0 is left to `redis_server.url`). Every farm, API and test client takes its own."""
    indexes = itertools.count(1)

    def allocate() -> str:
        index = next(indexes)
        if index >= redis_server.databases:
            raise RuntimeError(f"all {redis_server.databases} Redis databases handed out; raise REDIS_DATABASES")
        return f"redis://127.0.0.1:{redis_server.port}/{index}"

    return allocate


def _fresh_database(postgres: EmbeddedPostgres, name: str) -> str:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=postgres.port, user=postgres.user, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{postgres.user}@127.0.0.1:{postgres.port}/{name}"
    from shared.db.migrate import upgrade

    upgrade(url)
    return url


@pytest.fixture(scope="session")
def database_url(postgres: EmbeddedPostgres) -> str:
    return _fresh_database(postgres, "farm_test")


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    """A session on the shared test database (farm_test)."""
    engine = sa.create_engine(database_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WebUI-style models folder holding the tiny demo checkpoint, its ControlNet and upscalers, built by the
    project's own code (as `make up` builds them)."""
    path = tmp_path_factory.mktemp("models")
    for builder in DEMO_BUILDERS:
        subprocess.run([sys.executable, "-m", builder, str(path)], cwd=ROOT, check=True)
    return path


@pytest.fixture(scope="session")
def moto_s3(servers_dir: Path) -> Iterator[str]:
    """moto's standalone S3-compatible HTTP server, as a separate process."""
    import httpx

    port = free_port()
    log = open(servers_dir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(endpoint, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(up, 60, message="moto S3 server")
    yield endpoint
    proc.terminate()
    proc.wait(10)


def farm_env(*, database_url: str, redis_url: str, storage_url: str, models_dir: Path, admin_key: str,
             **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        STORAGE_URL=storage_url,
        RENDERFARM_MODELS_DIR=str(models_dir),
        RENDERFARM_ADMIN_KEY=admin_key,
        RENDERFARM_SECRET_KEY="test-secret",
        RENDERFARM_TORCH_THREADS="1",
        RENDERFARM_LEASE_SECONDS="10",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        # The job creation rate limit (on by default: a burst of 60, then 10 a second) would answer 429 to tests
        # that submit many jobs at once; the tests of the limits set tight ones per owner (tests/integration/
        # test_limits.py). The queued cap stays far above what that rate allows in a minute, so a submit
        # skips its count as in production (api/limits.py, `QueuedCounts`) and stays one transaction.
        RENDERFARM_DEFAULT_RATE_BURST="10000",
        RENDERFARM_DEFAULT_RATE_PER_SECOND="10000",
        RENDERFARM_DEFAULT_MAX_QUEUED="1000000",
    )
    env.update(extra)
    return env


ADMIN_KEY = "rf_test_admin_key_0123456789abcdef"
IN_PROCESS_URL = "http://testserver"  # the host FastAPI's TestClient answers as


@pytest.fixture(scope="session", params=["local", "s3"])
def farm(request: pytest.FixtureRequest, postgres: EmbeddedPostgres, redis_db_url: Callable[[], str],
         models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """The whole farm: API + one Celery worker, with images in a local folder or in S3 (moto)."""
    backend = request.param
    logs = tmp_path_factory.mktemp(f"farm-{backend}")
    if backend == "s3":
        endpoint = request.getfixturevalue("moto_s3")
        storage_url = f"s3://renderfarm-test?endpoint={endpoint}&create_bucket=1"
    else:
        storage_url = str(logs / "objects")
    env = farm_env(
        database_url=_fresh_database(postgres, f"farm_{backend}"),
        redis_url=redis_db_url(),
        storage_url=storage_url, models_dir=models_dir, admin_key=ADMIN_KEY,
        # Test receivers listen on loopback, which the SSRF guard refuses unless allowed.
        RENDERFARM_WEBHOOK_ALLOW_HOSTS="127.0.0.1", RENDERFARM_WEBHOOK_RETRY_SCHEDULE="1,1,2",
        RENDERFARM_WEBHOOK_JITTER="0",
        # Off by default (a submit's cost); on here so tests/e2e/test_metrics.py sees Celery's whole event stream.
        RENDERFARM_TASK_SENT_EVENTS="1",
    )
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    try:
        farm.procs.append(start_webhook_worker(env, logs))
        farm.procs.append(start_worker(env, logs))
        farm.backend = backend  # type: ignore[attr-defined]
        yield farm
    finally:
        farm.stop()


def reset_process_caches() -> None:
    """Forget what this process cached from the environment: the settings, engines, the Celery producer,
    Redis clients, the object store (every `functools.lru_cache` of a loaded `api`/`shared` module)."""
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in ("api", "shared"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type):
                continue  # a class whose instances cache (shared/owners/policy.py's PolicyCache): not a cache itself
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == name:
                value.cache_clear()


@pytest.fixture(scope="session")
def api_only_env(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings of the worker-less API: its own database, Redis database and objects folder."""
    objects = tmp_path_factory.mktemp("api-only") / "objects"
    return farm_env(
        database_url=_fresh_database(postgres, "farm_api_only"), redis_url=redis_db_url(),
        storage_url=str(objects), models_dir=models_dir, admin_key=ADMIN_KEY,
        RENDERFARM_MAX_PIXELS=str(1024 * 1024), RENDERFARM_PUBLIC_URL=IN_PROCESS_URL,
    )


@pytest.fixture(scope="module")
def api_only(api_only_env: dict[str, str]) -> Iterator[Farm]:
    """The API with no worker behind it, so a queue message it publishes stays visible in Redis.

    It runs in this process: `api.main:app` behind FastAPI's TestClient (lifespan included), with this
    process's environment pointing at the test servers for the module's duration. `client()` and
    `anonymous()` talk to it without a socket."""
    from fastapi.testclient import TestClient

    class Session(TestClient):
        """A client of the app the fixture started: `with` does not run the app's lifespan again."""

        def __enter__(self) -> Session:
            return self

        def __exit__(self, *args: object) -> None:
            pass

    with pytest.MonkeyPatch.context() as mp:
        for name, value in api_only_env.items():
            if os.environ.get(name) != value:
                mp.setenv(name, value)
        reset_process_caches()
        try:
            from api.main import app

            with TestClient(app, base_url=IN_PROCESS_URL) as started:  # runs the lifespan once

                def session(headers: dict[str, str]) -> Session:
                    # Like the httpx.Client of a subprocess API: redirects are answers, not followed.
                    client = Session(app, base_url=IN_PROCESS_URL, headers=headers, follow_redirects=False)
                    client.portal = started.portal  # the app's event loop, where its lifespan tasks run
                    return client

                yield Farm(base_url=IN_PROCESS_URL, admin_key=ADMIN_KEY, env=api_only_env, in_process=session)
        finally:
            reset_process_caches()


def make_key(database_url: str, owner: str, admin: bool = False) -> str:
    from shared.auth import create_api_key

    engine = sa.create_engine(database_url)
    with Session(engine) as session:
        _, key = create_api_key(session, owner, is_admin=admin)
        session.commit()
    engine.dispose()
    return key
