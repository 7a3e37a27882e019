"""`renderfarm owners list|set|reset` (devtools/owners.py) against a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from devtools.cli import main
from tests.conftest import make_key, reset_process_caches


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DATABASE_URL", database_url)
    reset_process_caches()
    yield database_url
    reset_process_caches()


def test_set_list_reset(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    make_key(cli_env, owner)
    assert main(["owners", "set", owner, "--weight", "2", "--max-running", "1", "--images-per-day", "40"]) == 0
    assert capsys.readouterr().out.strip() == f"{owner}: weight=2.0, max_running=1, images_per_day=40"

    assert main(["owners", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["owner", "weight", "max_running", "max_queued", "rate", "quotas/day",
                                "quotas/month", "today", "month"]
    line = next(row.split() for row in table if row.startswith(owner + " "))
    assert line[1:4] == ["2*", "1*", "10000"] and line[6] == "40*img"

    assert main(["owners", "set", owner, "--weight", "default"]) == 0
    assert capsys.readouterr().out.strip() == f"{owner}: weight=default"
    assert main(["owners", "reset", owner]) == 0
    assert "every limit is the default now" in capsys.readouterr().out
    main(["owners", "list"])
    line = next(row.split() for row in capsys.readouterr().out.splitlines() if row.startswith(owner + " "))
    assert line[1:3] == ["1", "0"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--weight", "0"], "--weight: Input should be greater than 0"),
    (["--max-running", "lots"], "--max-running: Input should be a valid integer"),
    (["--max-priority", "500"], "--max-priority: max_priority must be between -100 and 100"),
    ([], "nothing to set"),
])
def test_bad_values_name_the_flag(cli_env: str, capsys: pytest.CaptureFixture[str], argv: list[str],
                                  message: str) -> None:
    assert main(["owners", "set", "someone", *argv]) == 2
    assert message in capsys.readouterr().err
