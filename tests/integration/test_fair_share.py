"""Fair share in the claim (shared/jobs/fair_share.py, lifecycle.claim_batch with an order) against a real
PostgreSQL: owners take turns by recent render time per weight, priorities order one owner's jobs, an admin's
front wins, `max_running` holds with two workers claiming at once, and no job loses its message. The job view's
queue position (shared/jobs/views.py) orders owners as the claim does.

Each test uses a queue of its own, so other tests' queued jobs are never candidates."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg.sql
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import Job, OwnerPolicy
from shared.jobs import lifecycle, views
from shared.jobs.fair_share import FairOrder
from tests.conftest import reset_process_caches

ORDER = FairOrder(half_life_seconds=600.0, default_weight=1.0, default_max_running=0)
PARAMS = {"mode": "txt2img", "prompt": "p", "negative_prompt": "", "steps": 3, "cfg_scale": 7.0,
          "sampler_name": "Euler", "scheduler": "Automatic", "seed": 5, "width": 64, "height": 64}


@pytest.fixture
def route() -> str:
    return f"render.t.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def owners(session: Session) -> Iterator[Any]:
    """Unique owner names; their policies are removed afterwards."""
    made: list[str] = []

    def make(label: str) -> str:
        made.append(f"{label}-{uuid.uuid4().hex[:6]}")
        return made[-1]

    yield make
    session.rollback()
    session.execute(sa.delete(OwnerPolicy).where(OwnerPolicy.owner.in_(made)))
    session.commit()


@pytest.fixture
def settings_on_test_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's settings point at the test database (a poll's async read connects where they say)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    reset_process_caches()
    yield
    reset_process_caches()  # refilled from the environment as it was, once monkeypatch restores it


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[uuid.UUID, str]]:
    sent: list[tuple[uuid.UUID, str]] = []
    monkeypatch.setattr(lifecycle, "publish_render", lambda job_id, queue: sent.append((job_id, queue)))
    return sent


def queue(session: Session, owner: str, route: str, priority: int = 0, **params: Any) -> uuid.UUID:
    job = lifecycle.submit(session, owner=owner, api_key_id=None, params=PARAMS | {"model": "m"} | params,
                           model_name="m", route=route)
    job.priority = priority
    lifecycle.commit(session)
    return job.id


def policy(session: Session, owner: str, **values: Any) -> None:
    session.merge(OwnerPolicy(owner=owner, **values))
    session.commit()


def claim_one(session: Session, route: str, message: uuid.UUID, worker: str = "w1",
              order: FairOrder | None = ORDER) -> lifecycle.Job | None:
    batch = lifecycle.claim_batch(session, message, worker, 60, [route], max_images=0, order=order)
    lifecycle.commit(session)
    return batch[0] if batch else None


def finish(session: Session, job: lifecycle.Job, seconds: float = 1.0, worker: str = "w1") -> None:
    assert lifecycle.succeed(session, job.id, worker, [], render_seconds=seconds)
    lifecycle.commit(session)


def drain(session: Session, route: str, messages: list[uuid.UUID], order: FairOrder | None = ORDER,
          seconds: dict[str, float] | None = None) -> list[str]:
    """One worker taking one job per message, each rendering for ``seconds[owner]`` (default 1 s); the owners in
    the order their jobs ran."""
    ran: list[str] = []
    for message in messages:
        job = claim_one(session, route, message, order=order)
        if job is None:
            continue
        ran.append(job.owner)
        finish(session, job, (seconds or {}).get(job.owner, 1.0))
    return ran


def test_a_light_owner_is_not_stuck_behind_a_heavy_backlog(session: Session, route: str, owners: Any,
                                                           published: list[Any]) -> None:
    heavy, light = owners("heavy"), owners("light")
    messages = [queue(session, heavy, route) for _ in range(20)] + [queue(session, light, route) for _ in range(3)]
    ran = drain(session, route, messages)
    assert len(ran) == 23
    light_turns = [i for i, owner in enumerate(ran) if owner == light]
    assert light_turns == [1, 3, 5], ran  # taking turns with the heavy owner, not after its 20 jobs


def test_first_come_first_served_when_fair_share_is_off(session: Session, route: str, owners: Any,
                                                        published: list[Any]) -> None:
    heavy, light = owners("heavy"), owners("light")
    messages = [queue(session, heavy, route) for _ in range(5)] + [queue(session, light, route) for _ in range(2)]
    assert drain(session, route, messages, order=None) == [heavy] * 5 + [light] * 2


def test_weights_two_to_one_give_two_to_one_render_time(session: Session, route: str, owners: Any,
                                                        published: list[Any]) -> None:
    big, small = owners("big"), owners("small")
    policy(session, big, weight=2.0)
    messages = [queue(session, big, route) for _ in range(40)] + [queue(session, small, route) for _ in range(40)]
    ran = drain(session, route, messages[:30] + messages[40:70])[:30]  # the first 30 turns, both still busy
    shares = Counter(ran)
    assert abs(shares[big] - 20) <= 1 and abs(shares[small] - 10) <= 1, shares


def test_render_time_not_job_count_is_what_is_shared(session: Session, route: str, owners: Any,
                                                     published: list[Any]) -> None:
    """An owner whose jobs take 3x as long gets a third of the turns: fairness is in GPU time."""
    slow, quick = owners("slow"), owners("quick")
    messages = [queue(session, slow, route) for _ in range(20)] + [queue(session, quick, route) for _ in range(20)]
    ran = drain(session, route, messages[:16] + messages[20:36], seconds={slow: 3.0, quick: 1.0})[:16]
    shares = Counter(ran)
    assert abs(shares[quick] - 12) <= 1 and abs(shares[slow] - 4) <= 1, shares


def test_priorities_order_one_owners_jobs_and_the_front_wins(session: Session, route: str, owners: Any,
                                                             published: list[Any]) -> None:
    a, b = owners("a"), owners("b")
    low, normal, high = (queue(session, a, route, priority=p) for p in (-1, 0, 5))
    other = queue(session, b, route)
    fronted = queue(session, b, route)
    session.execute(sa.text("UPDATE jobs SET front_at = :now WHERE id = :id"), {"now": utcnow(), "id": fronted})
    session.commit()
    order = []
    for message in (low, normal, high, other, fronted):
        job = claim_one(session, route, message)
        assert job is not None
        order.append(job.id)
        finish(session, job)
    assert order[0] == fronted
    assert [job_id for job_id in order if job_id in (low, normal, high)] == [high, normal, low]


def test_a_spent_message_is_given_back_to_the_job_it_named(session: Session, route: str, owners: Any,
                                                           published: list[tuple[uuid.UUID, str]]) -> None:
    heavy, light = owners("heavy"), owners("light")
    first = queue(session, heavy, route)
    finish(session, claim_one(session, route, first))  # the heavy owner has used 1 s
    named = queue(session, heavy, route)
    fair = queue(session, light, route)
    published.clear()
    job = claim_one(session, route, named)
    assert job is not None and job.id == fair
    assert published == [(named, route)]  # the heavy job keeps a message: nobody waits for the recovery loop


def test_a_lone_owner_gets_every_worker(session: Session, route: str, owners: Any, published: list[Any]) -> None:
    alone = owners("alone")
    jobs = [queue(session, alone, route) for _ in range(3)]
    first = claim_one(session, route, jobs[0], worker="w1")
    second = claim_one(session, route, jobs[1], worker="w2")
    assert first is not None and second is not None and first.id != second.id


def test_max_running_holds_with_two_workers_claiming_at_once(database_url: str, session: Session, route: str,
                                                             owners: Any, published: list[Any]) -> None:
    capped, other = owners("capped"), owners("other")
    policy(session, capped, max_running=1)
    capped_jobs = [queue(session, capped, route) for _ in range(4)]
    other_job = queue(session, other, route)
    engine = sa.create_engine(database_url)
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def worker(name: str, message: uuid.UUID) -> None:
        with Session(engine, expire_on_commit=False) as own:
            barrier.wait()
            results[name] = claim_one(own, route, message, worker=name)

    threads = [threading.Thread(target=worker, args=(f"w{i}", capped_jobs[i])) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    engine.dispose()
    taken = {name: job.owner for name, job in results.items() if job is not None}
    assert sorted(taken.values()) == sorted([capped, other]), taken  # one capped job, and the other owner's
    running = session.scalar(sa.text("SELECT count(*) FROM jobs WHERE owner = :o AND status = 'running'"),
                             {"o": capped})
    assert running == 1
    # A third claim finds the capped owner at its cap and nothing else: it takes nothing.
    assert claim_one(session, route, capped_jobs[2], worker="w3") is None
    assert other_job in {job.id for job in results.values() if job is not None}


def test_a_capped_owners_next_job_is_nudged_when_its_running_job_ends(session: Session, route: str, owners: Any,
                                                                       published: list[tuple[uuid.UUID, str]]) -> None:
    capped = owners("capped")
    policy(session, capped, max_running=1)
    jobs = [queue(session, capped, route) for _ in range(3)]
    running = claim_one(session, route, jobs[0])
    assert running is not None and claim_one(session, route, jobs[1], worker="w2") is None  # at its cap
    finish(session, running)
    published.clear()
    lifecycle.nudge_capped_owners(session, [running.id], default_max_running=0)
    lifecycle.commit(session)
    assert published == [(jobs[1], route)]
    nudged = claim_one(session, route, jobs[1], worker="w2")
    assert nudged is not None and nudged.id == jobs[1]


def test_a_heavy_recent_users_new_job_is_placed_behind_a_fresh_owners(session: Session, route: str, owners: Any,
                                                                       published: list[Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The view's position counts each owner's recent render time as the claim does: the heavy owner's job, queued
    first, shows behind the fresh owner's three, and the claim takes them in that order."""
    monkeypatch.setattr(views.fleet, "live_worker_infos", lambda _client: [{"name": "w1:1", "ready": True}])
    views.FLEET_PACE.clear()
    heavy, fresh = owners("heavy"), owners("fresh")
    finish(session, claim_one(session, route, queue(session, heavy, route)), seconds=600.0)  # 10 min just used
    late = queue(session, heavy, route)
    early = [queue(session, fresh, route) for _ in range(3)]

    def position(job_id: uuid.UUID) -> int:
        job = session.get(Job, job_id)
        assert job is not None
        found = views.queue_position(session, job, 0.0)
        assert found is not None
        return found

    try:
        fresh_positions = [position(job_id) for job_id in early]
        heavy_position = position(late)
        pace = views.FLEET_PACE.latest()
    finally:
        views.FLEET_PACE.clear()
    assert fresh_positions == sorted(fresh_positions) and heavy_position > fresh_positions[-1], (
        fresh_positions, heavy_position)
    assert pace is not None and pace.workers == 1 and pace.seconds_per_step.get("m", 0) > 0  # read from the jobs
    assert drain(session, route, [late, *early]) == [fresh] * 3 + [heavy]


def test_a_polls_own_ahead_count_follows_the_owners_order(session: Session, route: str, owners: Any,
                                                          published: list[Any], settings_on_test_db: None) -> None:
    """The poll's one query counts the owner's queued jobs ahead of a job in the owner's order: every higher
    priority (whenever queued), the same priority queued earlier; not lower priorities, not jobs moved to the front,
    not other owners' jobs, not jobs that left the queue."""
    from shared.db.async_reads import close_reads
    from shared.jobs.repository import get_job_view_row

    me, other = owners("me"), owners("other")
    earlier_same = [queue(session, me, route) for _ in range(2)]
    queue(session, me, route, priority=-1)  # lower: never ahead
    high_early = queue(session, me, route, priority=5)
    queue(session, other, route, priority=9)  # another owner's
    target = queue(session, me, route)
    high_late = queue(session, me, route, priority=5)
    queue(session, me, route)  # same priority, later: behind
    fronted = session.get(Job, earlier_same[0])
    assert fronted is not None
    fronted.front_at = utcnow()  # an admin moved it to the front: counted by the snapshot, not here
    lifecycle.commit(session)

    def own_ahead(job_id: uuid.UUID) -> int | None:
        async def read() -> int | None:
            try:
                row = await get_job_view_row(job_id, me, fair=True)
            finally:
                await close_reads()
            assert row is not None
            return row.own_ahead

        return asyncio.run(read())

    assert own_ahead(target) == 3  # earlier_same[1], high_early, high_late
    assert own_ahead(high_early) == 0 and own_ahead(high_late) == 1
    assert lifecycle.claim(session, high_early, "w1", 60) is not None  # it runs now: no longer ahead
    lifecycle.commit(session)
    assert own_ahead(target) == 2
    assert own_ahead(high_early) is None


def test_a_polls_count_reads_the_owners_first_queued_jobs_not_the_finished_ones_before_them(
        session: Session, route: str, owners: Any, published: list[Any]) -> None:
    """A poll of a queued job counts at most `OWN_AHEAD_LIMIT` of its owner's jobs ahead of it, and reads about as
    many index entries, however many finished jobs are older than it and whatever PostgreSQL's statistics say:
    here they were gathered while the 1,500 older jobs were still queued (a long backlog since rendered), which led
    the planner to walk them all through the created_at index when the count was bounded by the job's own age."""
    from shared.jobs import repository

    me = owners("backlog")
    old = [lifecycle.new_job(owner=me, api_key_id=None, params=PARAMS | {"model": "m"}, model_name="m", route=route,
                             max_attempts=3, priority=0, published=True) for _ in range(1500)]
    session.execute(sa.insert(Job), old)
    session.commit()
    polled = [queue(session, me, route) for _ in range(25)]
    try:
        session.execute(sa.text("ANALYZE jobs"))
        session.execute(sa.update(Job).where(Job.id.in_([row["id"] for row in old]))
                        .values(status="succeeded", finished_at=utcnow()))
        session.commit()
        query = repository._JOB_VIEW_QUERIES[True]
        cursor = session.connection().connection.cursor()  # the query as a poll sends it: psycopg's own parameters
        # Planned for the values (a statement's first runs) and once for any (`async_reads.GENERIC_PLANS`).
        prepared = query._sql.replace("%(job_id)s", "$1").replace("%(owner)s", "$2").replace("%%", "%")
        cursor.execute(f"PREPARE poll AS {prepared}")
        for position, job_id in ((25, polled[-1]), (10, polled[9]), (1, polled[0])):
            params = {**query._defaults, "job_id": job_id, "owner": me}
            row = cursor.execute(query._sql, params).fetchone()
            assert row is not None and row[-1] == min(position - 1, repository.OWN_AHEAD_LIMIT)
            for mode in ("force_custom_plan", "force_generic_plan"):
                cursor.execute(f"SET plan_cache_mode = {mode}")
                explain = psycopg.sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE poll({}, {})")
                plan = cursor.execute(explain.format(str(job_id), me)).fetchone()[0]
                pages = plan[0]["Plan"]["Shared Hit Blocks"] + plan[0]["Plan"].get("Shared Read Blocks", 0)
                assert pages <= 40, (position, mode, pages)  # measured: 10 pages; the old form 106, walking the 1,500
        cursor.execute("RESET plan_cache_mode")
        cursor.execute("DEALLOCATE poll")
    finally:
        session.rollback()
        session.execute(sa.delete(Job).where(Job.owner == me))
        session.commit()
        session.execute(sa.text("ANALYZE jobs"))
        session.commit()


@pytest.mark.parametrize("fair", [True, False])
def test_a_polls_statements_are_planned_once_not_on_every_run(session: Session, route: str, owners: Any,
                                                               published: list[Any], settings_on_test_db: None,
                                                               fair: bool) -> None:
    """The statements a poll and the WebUI's progress poll run on the event loop's connections are prepared, and
    PostgreSQL plans each once (a generic plan), not on every run (which cost it more than running them)."""
    from shared.db.async_reads import close_reads, get_reads
    from shared.jobs import repository

    me = owners("planned")
    job_id = queue(session, me, route)

    async def poll() -> list[tuple[Any, ...]]:
        try:
            for _ in range(10):  # one at a time: the same connection each time
                assert await repository.get_job_view_row(job_id, me, fair) is not None
                assert (await repository.get_latest_job_row(me, fair))[0] is not None
            return await get_reads().rows("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
                                          "WHERE statement LIKE '%%jobs.training%%' "
                                          "AND statement NOT LIKE '%%pg_prepared_statements%%'", {})  # not itself
        finally:
            await close_reads()

    plans = asyncio.run(poll())
    assert len(plans) == 2 and all(generic >= 5 and custom == 0 for _, generic, custom in plans), plans
