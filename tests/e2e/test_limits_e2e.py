"""Limits against the API as a real process (uvicorn): the rate limit outlives a restart of the API (its bucket is in
Redis), and the admin dashboard's owners table shows each owner's limits and use in a real browser."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.embedded import EmbeddedPostgres
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env, make_key
from tests.farm_harness import Farm, start_api

pytestmark = pytest.mark.e2e

BODY = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
CHROMIUM = os.environ.get("RENDERFARM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def api_farm(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """The API alone, as a process; no worker (jobs stay queued)."""
    logs = tmp_path_factory.mktemp("limits-farm")
    env = farm_env(database_url=_fresh_database(postgres, "farm_limits"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY)
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    farm.logs = logs  # type: ignore[attr-defined]
    try:
        yield farm
    finally:
        farm.stop()


def test_the_rate_limit_outlives_an_api_restart(api_farm: Farm) -> None:
    owner = f"restart-{uuid.uuid4().hex[:6]}"
    key = make_key(api_farm.env["DATABASE_URL"], owner)
    with api_farm.client() as admin:
        policy = {"rate_burst": 2, "rate_per_second": 0.01}
        assert admin.put(f"/v1/admin/owners/{owner}", json=policy).status_code == 200
    with api_farm.client(key) as c:
        answers = [c.post("/v1/jobs", json={**BODY, "seed": i}) for i in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert answers[0].headers["RateLimit"] == '"burst";r=1;t=100'  # on a success too, through uvicorn

    api_farm.procs[0].stop()
    api, api_farm.base_url = start_api(api_farm.env, api_farm.logs, name="api-restarted")  # type: ignore[attr-defined]
    api_farm.procs[0] = api
    with api_farm.client(key) as c:
        refused = c.post("/v1/jobs", json=BODY)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 90
    assert refused.headers["RateLimit-Policy"] == '"burst";q=2;w=200'


def test_the_dashboard_lists_owners_with_their_limits(api_farm: Farm, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (make install adds it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    owner = f"dash-{uuid.uuid4().hex[:6]}"
    make_key(api_farm.env["DATABASE_URL"], owner)
    with api_farm.client() as admin:
        admin.put(f"/v1/admin/owners/{owner}", json={"weight": 3, "images_per_day": 40})
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(api_farm.base_url + "/admin")
            page.fill("#login-key", ADMIN_KEY)
            page.click("#login-submit")
            row = page.locator(f'#owners-table tr[data-owner="{owner}"]')
            sync_api.expect(row).to_be_visible(timeout=15_000)
            cells = row.locator("td").all_text_contents()
            page.screenshot(path=str(tmp_path / "admin-owners.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert cells[:4] == [owner, "3*", "0", "1000000"]  # the test farm's default queued cap
    assert cells[5] == "0 s · 40 img*" and cells[7:] == ["0.0 s", "0", "0.0 s", "0"]
