"""The gateway's cheap polls (issue 20): ETag/304, long-polls woken by job notices, what a request costs, the key
cache's revocation bound, a POST in one transaction.

The API runs in this process (httpx's ASGI transport against `api.main.app`, no lifespan) on the worker-less
API's database and Redis; jobs are moved by calling the lifecycle, as a worker would.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import make_key, reset_process_caches

KEY_CACHE_SECONDS = 1.0
BODY = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def gateway_env(api_only_env: dict[str, str]) -> Iterator[dict[str, str]]:
    env = {**api_only_env, "RENDERFARM_API_KEY_CACHE_SECONDS": str(KEY_CACHE_SECONDS)}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            if os.environ.get(name) != value:
                mp.setenv(name, value)
        reset_process_caches()
        _clear_gateway_caches()
        try:
            yield env
        finally:
            _clear_gateway_caches()
            reset_process_caches()


def _clear_gateway_caches() -> None:
    from shared.auth import API_KEY_CACHE
    from shared.jobs.views import FAIR_QUEUE_SNAPSHOT, FLEET_PACE, QUEUE_SNAPSHOT

    API_KEY_CACHE.clear()
    QUEUE_SNAPSHOT.clear()
    FAIR_QUEUE_SNAPSHOT.clear()
    FLEET_PACE.clear()


@pytest.fixture(autouse=True)
def _caches_cleared() -> None:
    """Each test starts with empty caches: its first poll reads the queue snapshots. (A poll may answer from a read up
    to twice the refresh interval old while the next runs, and the jobs other tests queued would show in positions,
    and so in ETags, that a test compares.)"""
    _clear_gateway_caches()


@pytest.fixture
def key(gateway_env: dict[str, str]) -> str:
    return make_key(gateway_env["DATABASE_URL"], f"gw-{uuid.uuid4().hex[:8]}")


def _client(key: str) -> httpx.AsyncClient:
    from api.main import app

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                             headers={"Authorization": f"Bearer {key}"}, timeout=120)


async def _submit(client: httpx.AsyncClient) -> str:
    resp = await client.post("/v1/jobs", json=BODY)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _claim(job_id: str, worker: str = "gw-test:1") -> None:
    from shared.db.session import get_session_factory
    from shared.jobs import lifecycle

    with get_session_factory()() as session:
        assert lifecycle.claim(session, uuid.UUID(job_id), worker, 60) is not None
        lifecycle.commit(session)


def _progress(job_id: str, value: float, worker: str = "gw-test:1") -> None:
    from shared.db.session import get_session_factory
    from shared.jobs import lifecycle

    with get_session_factory()() as session:
        assert lifecycle.report_progress(session, uuid.UUID(job_id), worker, value)
        lifecycle.commit(session)


class Counter:
    """SQL statements and transactions on the API's engine, and its polls' reads on the event loop
    (shared/db/async_reads.py, always autocommit: no transaction), while it is active."""

    def __init__(self) -> None:
        from shared.db import async_reads
        from shared.db.session import get_engine

        self.engine = get_engine()
        self.statements: list[str] = []
        self.transactions = 0
        self._async_reads = async_reads.statements_observed(self.statements.append)

    def _statement(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.statements.append(statement)

    def _begin(self, *_: Any) -> None:
        self.transactions += 1

    def __enter__(self) -> Counter:
        sa.event.listen(self.engine, "before_cursor_execute", self._statement)
        sa.event.listen(self.engine, "begin", self._begin)
        self._async_reads.__enter__()
        return self

    def __exit__(self, *_: object) -> None:
        self._async_reads.__exit__(None, None, None)
        sa.event.remove(self.engine, "before_cursor_execute", self._statement)
        sa.event.remove(self.engine, "begin", self._begin)


def test_etag_and_304(key: str) -> None:
    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            first = await client.get(f"/v1/jobs/{job_id}")
            assert first.status_code == 200 and first.json()["status"] == "queued"
            etag = first.headers["ETag"]
            again = await client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == etag
            other = await client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": 'W/"something-else"'})
            assert other.status_code == 200
            await asyncio.to_thread(_claim, job_id)
            moved = await client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
            assert moved.status_code == 200 and moved.json()["status"] == "running"
            assert moved.headers["ETag"] != etag
            await asyncio.to_thread(_progress, job_id, 0.5)
            stepped = await client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": moved.headers["ETag"]})
            assert stepped.status_code == 200 and stepped.json()["progress"] == 0.5

    asyncio.run(scenario())


def test_long_poll_returns_early_on_a_status_change_and_on_progress(key: str) -> None:
    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            etag = (await client.get(f"/v1/jobs/{job_id}")).headers["ETag"]
            started = time.monotonic()
            poll = asyncio.create_task(client.get(f"/v1/jobs/{job_id}", params={"wait": 30},
                                                  headers={"If-None-Match": etag}))
            await asyncio.sleep(0.5)
            assert not poll.done()
            await asyncio.to_thread(_claim, job_id)
            resp = await poll
            assert resp.status_code == 200 and resp.json()["status"] == "running"
            assert time.monotonic() - started < 5
            # Without If-None-Match: it waits for a change from the job as it was when it came.
            started = time.monotonic()
            poll = asyncio.create_task(client.get(f"/v1/jobs/{job_id}", params={"wait": 30}))
            await asyncio.sleep(0.5)
            assert not poll.done()
            await asyncio.to_thread(_progress, job_id, 0.25)
            resp = await poll
            assert resp.status_code == 200 and resp.json()["progress"] == 0.25
            assert time.monotonic() - started < 5

    asyncio.run(scenario())


def test_long_poll_returns_on_time_when_nothing_changes(key: str) -> None:
    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            first = await client.get(f"/v1/jobs/{job_id}")
            started = time.monotonic()
            resp = await client.get(f"/v1/jobs/{job_id}", params={"wait": 1.5},
                                    headers={"If-None-Match": first.headers["ETag"]})
            elapsed = time.monotonic() - started
            assert resp.status_code == 304, resp.text
            assert 1.4 <= elapsed < 3.5, elapsed
            started = time.monotonic()
            resp = await client.get(f"/v1/jobs/{job_id}", params={"wait": 1})
            elapsed = time.monotonic() - started
            assert resp.status_code == 200 and resp.json()["status"] == "queued"
            assert 0.9 <= elapsed < 3, elapsed
            # An out-of-date ETag, or a finished job, answers at once.
            started = time.monotonic()
            resp = await client.get(f"/v1/jobs/{job_id}", params={"wait": 30}, headers={"If-None-Match": 'W/"x"'})
            assert resp.status_code == 200 and time.monotonic() - started < 2

    asyncio.run(scenario())


def test_long_poll_of_an_unknown_job_is_404(key: str) -> None:
    async def scenario() -> None:
        async with _client(key) as client:
            resp = await client.get(f"/v1/jobs/{uuid.uuid4()}", params={"wait": 5})
            assert resp.status_code == 404

    asyncio.run(scenario())


def test_a_polls_bad_parameters_are_a_422_naming_each(key: str) -> None:
    """A poll's parameters are parsed by the route (`jobs.poll_parameters`), not by FastAPI: a bad one is still
    FastAPI's 422, naming the parameter, and a good one still works."""
    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            cases = [("/v1/jobs/not-a-uuid", {}, [["path", "job_id"]]),
                     (f"/v1/jobs/{job_id}", {"wait": "-1"}, [["query", "wait"]]),
                     (f"/v1/jobs/{job_id}", {"wait": "soon"}, [["query", "wait"]]),
                     (f"/v1/jobs/{job_id}", {"wait": "nan"}, [["query", "wait"]]),
                     ("/v1/jobs/nope", {"wait": "-2"}, [["path", "job_id"], ["query", "wait"]])]
            for path, params, where in cases:
                resp = await client.get(path, params=params)
                assert resp.status_code == 422, (path, params, resp.text)
                assert [error["loc"] for error in resp.json()["detail"]] == where, resp.text
            hyphenless = await client.get(f"/v1/jobs/{uuid.UUID(job_id).hex}", params={"wait": "0.0"})
            assert hyphenless.status_code == 200 and hyphenless.json()["id"] == job_id
            etag = hyphenless.headers["ETag"]
            assert (await client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})).status_code == 304

    asyncio.run(scenario())


def _view_reads(statements: list[str]) -> list[str]:
    return [s for s in statements if "LEFT OUTER JOIN job_images" in s]


def test_many_long_polls_hold_no_thread_and_no_connection(key: str) -> None:
    """200 clients long-polling one job: while they wait, no thread-pool slot and no pooled database connection
    is taken; one change answers them all (with one shared read)."""
    from shared.db.session import get_engine
    from shared.queueing import job_notices

    waiters = 200

    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            etag = (await client.get(f"/v1/jobs/{job_id}")).headers["ETag"]
            limiter = anyio.to_thread.current_default_thread_limiter()
            pool = get_engine().pool
            with Counter() as first_reads:
                polls = [asyncio.create_task(client.get(f"/v1/jobs/{job_id}", params={"wait": 60},
                                                        headers={"If-None-Match": etag}))
                         for _ in range(waiters)]
                hub = job_notices.get_hub()
                deadline = time.monotonic() + 45
                # Every one of them past its first read of the job, and nothing held any more.
                while time.monotonic() < deadline and (
                        len(_view_reads(first_reads.statements)) < waiters or limiter.borrowed_tokens
                        or pool.checkedout()):
                    await asyncio.sleep(0.05)
            assert len(_view_reads(first_reads.statements)) >= waiters
            assert hub.waiter_count() == waiters
            await asyncio.sleep(0.5)
            assert limiter.borrowed_tokens == 0, limiter.borrowed_tokens
            assert pool.checkedout() == 0, pool.status()
            assert not any(poll.done() for poll in polls)
            with Counter() as counter:
                started = time.monotonic()
                await asyncio.to_thread(_claim, job_id)
                answers = await asyncio.gather(*polls)
            assert all(a.status_code == 200 and a.json()["status"] == "running" for a in answers)
            assert time.monotonic() - started < 10
            assert len(_view_reads(counter.statements)) < 10  # the waiters share their re-reads
            assert hub.waiter_count() == 0

    asyncio.run(scenario())


def test_a_poll_is_one_query(key: str) -> None:
    """With the key cached, a GET is one statement: the job, its images and, while it is queued, the (bounded)
    count of the queued jobs ahead of it."""
    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            await client.get(f"/v1/jobs/{job_id}")  # the key is cached now
            with Counter() as counter:
                for _ in range(5):
                    assert (await client.get(f"/v1/jobs/{job_id}")).json()["queue_position"] >= 1
            assert len(counter.statements) == 5, [s[:60] for s in counter.statements]
            assert counter.transactions == 0  # each poll's one statement stands alone (autocommit)
            await asyncio.to_thread(_claim, job_id)
            with Counter() as counter:
                resp = await client.get(f"/v1/jobs/{job_id}")
            assert resp.json()["status"] == "running"
            assert len(counter.statements) == 1, counter.statements
            assert counter.transactions == 0

    asyncio.run(scenario())


def test_a_job_list_and_a_webui_progress_poll_are_one_query_each(key: str) -> None:
    """The list (a page with its images and the total) and `/sdapi/v1/progress` (the newest job, the queue ahead
    of it, the caller's active jobs) are one statement each once the key is cached, whatever the page holds."""
    async def scenario() -> None:
        async with _client(key) as client:
            first, second = await _submit(client), await _submit(client)
            await asyncio.to_thread(_claim, first)
            _clear_gateway_caches()  # so that this GET reads the queue snapshots: not again in the counted second
            await client.get(f"/v1/jobs/{second}")
            with Counter() as counter:
                page = (await client.get("/v1/jobs", params={"limit": 5})).json()
                progress = (await client.get("/sdapi/v1/progress")).json()
            assert len(counter.statements) == 2, counter.statements
            assert [job["id"] for job in page["jobs"]] == [second, first] and page["total"] == 2
            assert progress["state"]["job_count"] == 2 and progress["state"]["job"] == f"job {second}"
            position = (await client.get(f"/v1/jobs/{second}")).json()["queue_position"]
            assert progress["textinfo"].endswith(f"queued, position {position}")  # the job GET's own count
            queued = (await client.get("/v1/jobs", params={"status": "queued"})).json()
            assert [job["id"] for job in queued["jobs"]] == [second] and queued["total"] == 1
            past_the_end = (await client.get("/v1/jobs", params={"offset": 10})).json()
            assert past_the_end["jobs"] == [] and past_the_end["total"] == 2
            other_model = (await client.get("/v1/jobs", params={"model": "no-such-model"})).json()
            assert other_model == {"jobs": [], "total": 0, "limit": 20, "offset": 0}

    asyncio.run(scenario())


def test_a_queued_job_has_an_eta_that_grows_with_its_position(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued job's view (and the WebUI API's progress) estimates when it will be done from its queue position,
    the live workers and the recent pace (shared/jobs/views.py `queued_eta`); without a live worker there is none."""
    from shared.jobs import views

    async def scenario() -> None:
        async with _client(key) as client:
            ids = [await _submit(client) for _ in range(3)]
            alone = (await client.get(f"/v1/jobs/{ids[0]}")).json()
            assert alone["queue_position"] >= 1 and alone["eta_seconds"] is None  # no worker in this farm
            monkeypatch.setattr(views.fleet, "live_worker_infos",
                                lambda _client: [{"name": "gw-eta:1", "ready": True, "current_job": "elsewhere"}])
            views.FLEET_PACE.clear()
            jobs = [(await client.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
            positions = [job["queue_position"] for job in jobs]
            etas = [job["eta_seconds"] for job in jobs]
            assert positions == sorted(set(positions)), positions
            assert None not in etas and 0 < etas[0] < etas[1] < etas[2], etas
            progress = (await client.get("/sdapi/v1/progress")).json()  # the newest job: the third
            assert progress["textinfo"].endswith(f"queued, position {positions[2]}")
            assert progress["eta_relative"] == etas[2] and progress["progress"] == 0

    try:
        asyncio.run(scenario())
    finally:
        views.FLEET_PACE.clear()


def _drop_idle_connections(database_url: str) -> int:
    """What a database restart does to the API's pooled connections: every idle one is closed by the server."""
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        killed = conn.execute(sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle'")).scalar_one()
    engine.dispose()
    return int(killed)


@pytest.fixture
def dropped_connections_discarded() -> Iterator[None]:
    """A test that drops connections leaves none of them to the next test: a pooled connection used a moment ago
    is not pinged (shared/db/session.py), and the pool keeps up to RENDERFARM_DB_POOL_SIZE of them."""
    yield
    from shared.db.session import get_engine

    get_engine().dispose()


@pytest.mark.usefixtures("dropped_connections_discarded")
def test_a_pooled_connection_that_died_while_idle_is_replaced_unseen(gateway_env: dict[str, str], key: str) -> None:
    """Connections are pinged only after sitting idle (shared/db/session.py): one the database dropped meanwhile
    (a restart, an idle timeout) is replaced before the request uses it, so the request still answers 200."""
    from shared.db.session import PING_AFTER_IDLE_SECONDS

    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
            assert _drop_idle_connections(gateway_env["DATABASE_URL"]) >= 1
            await asyncio.sleep(PING_AFTER_IDLE_SECONDS + 0.2)
            assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
            assert (await client.post("/v1/jobs", json=BODY)).status_code == 202

    asyncio.run(scenario())


@pytest.mark.usefixtures("dropped_connections_discarded")
def test_a_read_that_meets_a_connection_dropped_a_moment_ago_is_repeated(gateway_env: dict[str, str],
                                                                        key: str) -> None:
    """A connection used a moment ago is not pinged; if the database dropped it meanwhile (a restart), the read
    fails on it, SQLAlchemy invalidates the pool, and the read is repeated on a fresh connection: still 200."""
    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
            assert _drop_idle_connections(gateway_env["DATABASE_URL"]) >= 1
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs", "/sdapi/v1/progress"):
                assert (await client.get(path)).status_code == 200, path

    asyncio.run(scenario())


def test_a_submit_is_one_statement_and_holds_no_connection_after(gateway_env: dict[str, str], key: str) -> None:
    """Without a webhook, a submit writes its row (and its Idempotency-Key's record) in one statement on the event
    loop, in autocommit; with a webhook, in one transaction (its delivery is recorded with it). A replayed key
    costs the one statement that found it taken, then the transaction that reads the earlier job."""
    from shared.db.session import get_engine

    def own_statements(counter: Counter) -> list[str]:  # less the queue snapshot's read, when it was due
        return [s for s in counter.statements if not s.lstrip().startswith("SELECT jobs.created_at")]

    async def scenario() -> None:
        async with _client(key) as client:
            await _submit(client)  # the key is cached now
            for headers in ({}, {"Idempotency-Key": f"gw-{uuid.uuid4()}"}):
                with Counter() as counter:
                    resp = await client.post("/v1/jobs", json=BODY, headers=headers)
                assert resp.status_code == 202, resp.text
                written = own_statements(counter)
                assert len(written) == 1 and counter.transactions == len(counter.statements) - 1, counter.statements
                assert written[0].lstrip().startswith("WITH recorded AS" if headers else "INSERT INTO jobs")
                assert get_engine().pool.checkedout() == 0
                job_id = resp.json()["id"]
                if headers:
                    with Counter() as counter:
                        replay = await client.post("/v1/jobs", json=BODY, headers=headers)
                    assert replay.json()["id"] == job_id and counter.transactions == 1
                    assert own_statements(counter)[0].lstrip().startswith("WITH recorded AS")
            with Counter() as counter:
                resp = await client.post("/v1/jobs", json={**BODY, "webhook_url": "https://8.8.8.8/hook"})
            assert resp.status_code == 202, resp.text
            assert counter.transactions == 1 + (len(counter.statements) > len(own_statements(counter)))
            assert get_engine().pool.checkedout() == 0

    asyncio.run(scenario())
    engine = sa.create_engine(gateway_env["DATABASE_URL"])
    with engine.connect() as conn:
        unpublished = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE published_at IS NULL")).scalar_one()
    engine.dispose()
    assert unpublished == 0


def test_a_submit_checks_on_the_event_loop_unless_a_check_would_block(gateway_env: dict[str, str], key: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A job without images or a webhook is checked on the event loop: no hop to a thread (it cost a submit more
    CPU than the checks). A check that would block there, hashing a LoRA the farm has not seen yet, moves the checks
    to a thread (`shared.blocking`); once hashed, the same job is checked on the loop again. Images and webhooks
    still go to the thread."""
    from pathlib import Path

    from api.routes import jobs
    from devtools.demo_models.lora_sd15 import write_demo_lora

    hops: list[str] = []
    original = jobs.run_in_threadpool

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(jobs, "run_in_threadpool", counted)
    lora = f"gw-new-{uuid.uuid4().hex[:8]}"
    write_demo_lora(Path(gateway_env["RENDERFARM_MODELS_DIR"]) / "Lora" / f"{lora}.safetensors", seed=7)
    with_lora = {**BODY, "prompt": f"a lighthouse <lora:{lora}:0.8>"}

    async def hops_of(client: httpx.AsyncClient, body: dict[str, Any]) -> list[str]:
        hops.clear()
        resp = await client.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        return list(hops)

    async def scenario() -> None:
        async with _client(key) as client:
            await _submit(client)  # the key is cached now
            assert await hops_of(client, BODY) == []
            assert await hops_of(client, with_lora) == ["prepare"]  # its hash would block the loop
            assert await hops_of(client, with_lora) == []  # hashed once, by the thread
            assert await hops_of(client, {**BODY, "webhook_url": "https://8.8.8.8/hook"}) == ["prepare"]

    asyncio.run(scenario())


def test_concurrent_submits_with_one_idempotency_key_make_one_job(key: str) -> None:
    async def scenario() -> None:
        async with _client(key) as client:
            headers = {"Idempotency-Key": f"gw-{uuid.uuid4()}"}
            answers = await asyncio.gather(*(client.post("/v1/jobs", json=BODY, headers=headers) for _ in range(8)))
            assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
            assert len({a.json()["id"] for a in answers}) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("extra", [{}, {"webhook_url": "https://8.8.8.8/hook"}], ids=["on the loop", "in a thread"])
def test_a_message_that_cannot_be_sent_leaves_the_job_unpublished(gateway_env: dict[str, str], key: str,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 extra: dict[str, str]) -> None:
    """The row is inserted as published; when the broker refuses the message, the job is un-marked so the recovery
    loop publishes it (as before, when `published_at` was set after the message went out). Both ways a submit is
    written: on the event loop (`lifecycle.submit_now`) and, with a webhook, in a thread (`lifecycle.submit`)."""
    from shared.jobs import lifecycle

    def broken(*_: object) -> None:
        raise ConnectionError("broker down")

    async def broken_async(*_: object) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(lifecycle, "publish_render", broken)
    monkeypatch.setattr(lifecycle, "publish_render_async", broken_async)

    async def scenario() -> str:
        async with _client(key) as client:
            resp = await client.post("/v1/jobs", json={**BODY, **extra})
            assert resp.status_code == 202, resp.text
            return str(resp.json()["id"])

    job_id = asyncio.run(scenario())
    engine = sa.create_engine(gateway_env["DATABASE_URL"])
    with engine.connect() as conn:
        published = conn.execute(sa.text("SELECT published_at FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
    engine.dispose()
    assert published is None


def test_a_revoked_key_is_refused_within_the_cache_bound(gateway_env: dict[str, str], key: str) -> None:
    from shared.auth import hash_key

    async def scenario() -> dict[str, float]:
        async with _client(key) as client:
            submitted = await client.post("/v1/jobs", json=BODY)
            assert submitted.status_code == 202, submitted.text
            # the list reads the key in a thread, a job's poll on the event loop (the cached owner, no row built)
            paths = ["/v1/jobs", f"/v1/jobs/{submitted.json()['id']}"]
            for path in paths:
                assert (await client.get(path)).status_code == 200  # cached now
            engine = sa.create_engine(gateway_env["DATABASE_URL"])
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE api_keys SET revoked_at = now() WHERE key_hash = :h"),
                             {"h": hash_key(key)})
            engine.dispose()
            revoked, refused = time.monotonic(), {}
            while time.monotonic() - revoked < KEY_CACHE_SECONDS + 5:
                for path in paths:
                    if path not in refused and (await client.get(path)).status_code == 401:
                        refused[path] = time.monotonic() - revoked
                if len(refused) == len(paths):
                    return refused
                await asyncio.sleep(0.05)
            raise AssertionError(f"the revoked key was still accepted (refused only on {sorted(refused)})")

    refused_after = asyncio.run(scenario())
    assert max(refused_after.values()) <= KEY_CACHE_SECONDS + 0.5, refused_after


def test_the_webhook_secret_is_not_served_stale_from_the_key_cache(key: str) -> None:
    async def scenario() -> None:
        async with _client(key) as client:
            first = (await client.get("/v1/webhook-secret")).json()["secret"]
            rotated = (await client.post("/v1/webhook-secret/rotate")).json()["secret"]
            assert rotated != first
            assert (await client.get("/v1/webhook-secret")).json()["secret"] == rotated

    asyncio.run(scenario())


def test_api_process_count_defaults_to_the_cores() -> None:
    from shared.settings import GatewaySettings

    assert GatewaySettings(api_workers=0).api_worker_count() == max(1, os.cpu_count() or 1)
    assert GatewaySettings(api_workers=3).api_worker_count() == 3


def test_sixteen_concurrent_polls_reuse_pooled_connections(key: str) -> None:
    """The pool keeps as many connections as 16 concurrent requests use (RENDERFARM_DB_POOL_SIZE, 16): once 16 were
    open at once, bursts of 16 polls open no connection (with 5 kept, each burst opened and closed 11, a new
    PostgreSQL backend per request, which cost the database six times the poll's own query)."""
    from shared.db.session import get_engine

    engine = get_engine()
    assert engine.pool.size() == 16  # type: ignore[attr-defined]
    opened: list[object] = []

    def on_connect(*_: Any) -> None:
        opened.append(object())

    async def burst(client: httpx.AsyncClient, job_id: str) -> None:
        answers = await asyncio.gather(*(client.get(f"/v1/jobs/{job_id}") for _ in range(16)))
        assert all(answer.status_code == 200 for answer in answers)

    async def scenario() -> None:
        async with _client(key) as client:
            job_id = await _submit(client)
            held = [engine.connect() for _ in range(16)]  # as many at once as a burst can use
            for connection in held:
                connection.close()  # back to the pool: kept up to pool_size, closed past it
            sa.event.listen(engine, "connect", on_connect)
            try:
                for _ in range(5):
                    await burst(client, job_id)
            finally:
                sa.event.remove(engine, "connect", on_connect)

    asyncio.run(scenario())
    assert opened == []
