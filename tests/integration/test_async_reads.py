"""`shared.db.async_reads`: the event loop's statements (a poll, the WebUI's progress, a submit's insert) on asyncpg,
written with psycopg's ``%(name)s`` parameters; a connection the server dropped is replaced, a failed statement
leaves its connection usable."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from shared.db.async_reads import AsyncReads, numbered


def test_named_parameters_become_numbered_ones_once_each() -> None:
    text, names = numbered("SELECT %(a)s, %(b)s::UUID, %(a)s WHERE x LIKE '%%y%%'")
    assert text == "SELECT $1, $2::UUID, $1 WHERE x LIKE '%y%'" and names == ("a", "b")


def run(database_url: str, scenario: Any) -> Any:
    async def main() -> Any:
        reads = AsyncReads(database_url, 2)
        try:
            return await scenario(reads)
        finally:
            await reads.close()

    return asyncio.run(main())


def test_values_go_in_and_come_out_as_python_values(database_url: str) -> None:
    job_id = uuid.uuid4()

    async def scenario(reads: AsyncReads) -> Any:
        return (await reads.rows("SELECT %(id)s::UUID, %(doc)s::jsonb, %(doc)s::json, %(n)s::bigint + 1",
                                 {"id": job_id, "doc": {"prompt": "a cat", "loras": [["x", 0.5]]}, "n": 41}))[0]

    row = run(database_url, scenario)
    assert row[0] == job_id and row[1] == row[2] == {"prompt": "a cat", "loras": [["x", 0.5]]} and row[3] == 42
    assert tuple(row[1:3]) == (row[1], row[2])  # rows slice like tuples (`repository.get_job_view_row`)


def test_a_connection_the_server_dropped_is_replaced_and_the_statement_runs_again(database_url: str) -> None:
    async def scenario(reads: AsyncReads) -> tuple[int, int, int]:
        first = (await reads.rows("SELECT pg_backend_pid()", {}))[0][0]
        killer = await asyncpg.connect(database_url.replace("+psycopg", ""))
        try:
            assert (await killer.fetchval("SELECT pg_terminate_backend($1)", first)) is True
            await asyncio.sleep(0.2)
        finally:
            await killer.close()
        second = (await reads.rows("SELECT pg_backend_pid()", {}))[0][0]
        third = (await reads.rows("SELECT pg_backend_pid()", {}))[0][0]
        return first, second, third

    first, second, third = run(database_url, scenario)
    assert second != first and third == second  # a new connection, kept for the next statement


def test_a_failed_statement_raises_and_its_connection_serves_the_next(database_url: str) -> None:
    async def scenario(reads: AsyncReads) -> tuple[int, int]:
        before = (await reads.rows("SELECT pg_backend_pid()", {}))[0][0]
        with pytest.raises(asyncpg.DivisionByZeroError):
            await reads.rows("SELECT 1 / %(zero)s::int", {"zero": 0})
        return before, (await reads.rows("SELECT pg_backend_pid()", {}))[0][0]

    before, after = run(database_url, scenario)
    assert before == after
