"""The owner's job list (`repository.list_jobs`, `GET /v1/jobs`) against a real PostgreSQL: its page, its total and
what they cost. The page is the first entries of `ix_jobs_owner_created` (owner, created_at DESC, id), the total an
index-only count of the owner's entries in the same statement. Before (issue 20: the list fell from 0.18 to 0.01 of
`/healthz` as the owner's jobs grew), the index lacked the id the list also orders by, so PostgreSQL read the owner's
rows in full (or walked `ix_jobs_created_at` past other owners' jobs) and sorted them all to keep one page, and the
total was a window count over them (twice the CPU of the count at 44,000 jobs)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.db.models import Job
from shared.jobs import lifecycle, repository
from shared.jobs.states import JobStatus

PARAMS = {"mode": "txt2img", "prompt": "a long prompt " * 20, "negative_prompt": "", "steps": 3, "cfg_scale": 7.0,
          "sampler_name": "Euler", "scheduler": "Automatic", "seed": 5, "width": 64, "height": 64}
MANY = 2000


@pytest.fixture
def owner(session: Session, database_url: str) -> Iterator[str]:
    """An owner with MANY jobs (every tenth succeeded, the rest queued) and as many of another owner's, vacuumed so
    the index's entries are visible without the table (as autovacuum leaves a table that is not being written)."""
    me, other = f"list-{uuid.uuid4().hex[:8]}", f"list-other-{uuid.uuid4().hex[:8]}"
    rows = [lifecycle.new_job(owner=name, api_key_id=None, params=PARAMS, model_name="m", route="render.t.list",
                              max_attempts=3, priority=0, published=True) for name in (me, other) for _ in range(MANY)]
    for n, row in enumerate(rows):
        if n % 10 == 0:
            row["status"] = JobStatus.SUCCEEDED.value
    session.execute(sa.insert(Job), rows)
    session.commit()
    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("VACUUM (ANALYZE) jobs"))
    try:
        yield me
    finally:
        session.rollback()
        session.execute(sa.delete(Job).where(Job.owner.in_([me, other])))
        session.commit()
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE jobs"))
        engine.dispose()


def _pages_read(session: Session, run: Any) -> tuple[Any, int]:
    """What ``run`` returns and the most buffers one statement it ran read (EXPLAIN ANALYZE of each)."""
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        statements.append((statement, parameters))

    connection = session.connection()
    sa.event.listen(connection, "before_cursor_execute", seen)
    try:
        result = run()
    finally:
        sa.event.remove(connection, "before_cursor_execute", seen)
    cursor = connection.connection.cursor()
    most = 0
    for statement, parameters in statements:
        plan = cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters).fetchone()[0]
        top = plan[0]["Plan"]
        most = max(most, top["Shared Hit Blocks"] + top.get("Shared Read Blocks", 0))
    return result, most


def test_a_page_and_its_total(session: Session, owner: str) -> None:
    jobs, total = repository.list_jobs(session, owner, limit=20)
    assert total == MANY and len(jobs) == 20
    created = [job.created_at for job in jobs]
    assert created == sorted(created, reverse=True) and all(job.owner == owner for job in jobs)
    queued, queued_total = repository.list_jobs(session, owner, status=JobStatus.QUEUED, limit=5, offset=10)
    assert queued_total == MANY - MANY // 10 and len(queued) == 5
    assert all(job.status == JobStatus.QUEUED for job in queued)
    assert repository.list_jobs(session, owner, status=JobStatus.SUCCEEDED, limit=500)[1] == MANY // 10
    assert repository.list_jobs(session, owner, offset=MANY + 5) == ([], MANY)  # past the end: counted on its own
    assert repository.list_jobs(session, owner, model="none") == ([], 0)


def test_the_total_reads_the_owners_index_entries_not_every_row(session: Session, owner: str) -> None:
    """The statement reads a few pages per thousand of the owner's jobs (measured: 124 pages, 60 of them the page's
    20 rows); without the id in the owner's index it read the table (here 4,000 rows of two owners: 453 pages)."""
    table_pages = session.scalar(sa.text("SELECT pg_relation_size('jobs') / current_setting('block_size')::int"))
    (jobs, total), pages = _pages_read(session, lambda: repository.list_jobs(session, owner, limit=20))
    assert total == MANY and len(jobs) == 20
    assert pages < table_pages / 4, (pages, table_pages)
