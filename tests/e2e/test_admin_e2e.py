"""Pause and resume against real worker processes, and the dashboard in a real headless browser.

This module runs its own farm (API + worker, own database and Redis db) because it pauses
it: the session's shared farms keep taking jobs whatever happens here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.embedded import EmbeddedPostgres
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env, make_key
from tests.farm_harness import Farm, Proc, start_api, start_webhook_worker, start_worker, wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

TINY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
CHROMIUM = os.environ.get("RENDERFARM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def admin_farm(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    logs = tmp_path_factory.mktemp("admin-farm")
    env = farm_env(
        database_url=_fresh_database(postgres, "farm_admin"),
        redis_url=redis_db_url(),
        storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY,
        RENDERFARM_SAMPLE_SECONDS="2", RENDERFARM_PAUSE_POLL_SECONDS="1",
        # The admin's cancel and retry send the owner's webhooks to a receiver on loopback.
        RENDERFARM_WEBHOOK_ALLOW_HOSTS="127.0.0.1", RENDERFARM_WEBHOOK_RETRY_SCHEDULE="1,1,2",
        RENDERFARM_WEBHOOK_JITTER="0",
    )
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    farm.logs = logs  # type: ignore[attr-defined]
    try:
        farm.procs.append(start_webhook_worker(env, logs))
        farm.procs.append(start_worker(env, logs, name="a1"))
        yield farm
    finally:
        farm.stop()


def admin(farm: Farm, method: str, path: str) -> dict[str, Any]:
    with farm.client() as client:
        resp = client.request(method, path)
    assert resp.status_code == 200, resp.text
    return resp.json()


def statuses(farm: Farm, ids: list[str]) -> list[str]:
    with farm.client() as client:
        return [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]


def wait_running(farm: Farm, job_id: str, timeout: float = 60) -> None:
    wait_until(lambda: statuses(farm, [job_id]) == ["running"], timeout, message=f"job {job_id} to start")


def test_pause_holds_queued_jobs_and_resume_drains_them(admin_farm: Farm) -> None:
    paused = admin(admin_farm, "POST", "/v1/admin/queue/pause")
    try:
        assert paused["paused"] is True
        assert any(name.startswith("a1@") for name in paused["workers_notified"]), paused
        ids = [admin_farm.submit(TINY | {"seed": i})["id"] for i in range(3)]
        time.sleep(3)  # a 64px 2-step job renders in well under a second: any taker would have finished
        assert statuses(admin_farm, ids) == ["queued"] * 3
        queue = admin(admin_farm, "GET", "/v1/admin/queue")
        assert (queue["database"]["queued"], queue["database"]["running"]) == (3, 0)
        assert queue["broker"]["waiting"] == 3  # nothing lost: the messages wait in Redis
        assert queue["pause"]["paused"] is True
    finally:
        resumed = admin(admin_farm, "POST", "/v1/admin/queue/resume")
    assert resumed["paused"] is False
    for job_id in ids:
        assert admin_farm.wait_for(job_id, timeout=60)["status"] == "succeeded"
    queue = admin(admin_farm, "GET", "/v1/admin/queue")
    assert (queue["database"]["queued"], queue["database"]["running"], queue["broker"]["waiting"]) == (0, 0, 0)


def test_a_worker_started_while_paused_takes_nothing(admin_farm: Farm) -> None:
    admin(admin_farm, "POST", "/v1/admin/queue/pause")
    second: Proc | None = None
    try:
        # Messages wait *before* the worker starts: were it to consume at start-up, it would take one at once.
        ids = [admin_farm.submit(TINY | {"seed": 10 + i})["id"] for i in range(2)]
        second = start_worker(admin_farm.env, admin_farm.logs, name="a2")  # type: ignore[attr-defined]
        time.sleep(3)
        assert statuses(admin_farm, ids) == ["queued"] * 2
        assert "Canceling queue render" in second.log()
        admin(admin_farm, "POST", "/v1/admin/queue/resume")
        for job_id in ids:
            assert admin_farm.wait_for(job_id, timeout=60)["status"] == "succeeded"
        fleet = admin(admin_farm, "GET", "/v1/admin/workers")
        assert {w["name"].split(":")[0] for w in fleet["workers"] if w["state"] != "lost"} >= {"a1", "a2"}
        live = [w for w in fleet["workers"] if w["state"] != "lost"]
        # Each worker says how much room it has: its own resident set and the device's free/total memory.
        assert all(0 < w["memory"]["process_rss"] and 0 < w["memory"]["device_free"] <= w["memory"]["device_total"]
                   for w in live), live
        assert all(w["device"] == "cpu" and w["models"] == ["demo-tiny"] for w in live)
    finally:
        admin(admin_farm, "POST", "/v1/admin/queue/resume")
        if second is not None:
            second.stop(signal.SIGTERM)

    def a2_lost() -> bool:
        workers = admin(admin_farm, "GET", "/v1/admin/workers")["workers"]
        return any(w["name"].startswith("a2:") and w["state"] == "lost" for w in workers)

    # A worker silent past three heartbeats shows as lost (lease 10 s: a beat every 2.5 s).
    wait_until(a2_lost, 30, interval=0.5, message="the stopped worker to show as lost")


def test_a_worker_that_missed_the_broadcast_follows_the_flag_within_its_poll(admin_farm: Farm) -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from shared.queueing.farm_state import set_paused

    engine = sa.create_engine(admin_farm.env["DATABASE_URL"])

    def set_flag(paused: bool) -> None:  # the flag alone, no broadcast: as if every worker missed it
        with Session(engine) as session:
            set_paused(session, paused, by="test")
            session.commit()

    try:
        set_flag(True)
        time.sleep(2.5)  # the worker polls every second here
        job = admin_farm.submit(TINY | {"seed": 55})["id"]
        time.sleep(2)
        assert statuses(admin_farm, [job]) == ["queued"]
        set_flag(False)
        assert admin_farm.wait_for(job, timeout=30)["status"] == "succeeded"
    finally:
        set_flag(False)
        engine.dispose()


def test_a_running_job_finishes_when_paused(admin_farm: Farm) -> None:
    long_job = admin_farm.submit(TINY | {"width": 256, "height": 256, "steps": 40, "seed": 99})["id"]
    wait_running(admin_farm, long_job)
    try:
        admin(admin_farm, "POST", "/v1/admin/queue/pause")
        assert admin(admin_farm, "GET", "/v1/admin/queue")["database"]["running"] == 1
        waiting = admin_farm.submit(TINY | {"seed": 100})["id"]
        assert admin_farm.wait_for(long_job, timeout=120)["status"] == "succeeded"  # running ones finish
        time.sleep(2)
        assert statuses(admin_farm, [waiting]) == ["queued"]  # queued ones wait
    finally:
        admin(admin_farm, "POST", "/v1/admin/queue/resume")
    assert admin_farm.wait_for(waiting, timeout=60)["status"] == "succeeded"


def test_admin_cancels_and_retries_any_owners_job(admin_farm: Farm) -> None:
    user_key = make_key(admin_farm.env["DATABASE_URL"], "someone")
    admin(admin_farm, "POST", "/v1/admin/queue/pause")
    try:
        job = admin_farm.submit(TINY | {"seed": 321}, key=user_key)
        canceled = admin(admin_farm, "POST", f"/v1/admin/jobs/{job['id']}/cancel")
        assert canceled["outcome"] == "canceled" and canceled["job"]["status"] == "canceled"
        with admin_farm.client() as client:
            again = client.post(f"/v1/admin/jobs/{job['id']}/cancel").json()
            assert again["outcome"] == "terminal"
            retry = client.post(f"/v1/admin/jobs/{job['id']}/retry")
        assert retry.status_code == 202, retry.text
        new_job = retry.json()["job"]
        assert retry.json()["retry_of"] == job["id"] and new_job["id"] != job["id"]
        assert new_job["status"] == "queued" and new_job["seeds"] == [321]
        detail = admin(admin_farm, "GET", f"/v1/admin/jobs/{new_job['id']}")
        assert detail["owner"] == "someone"
    finally:
        admin(admin_farm, "POST", "/v1/admin/queue/resume")
    # The retry belongs to the job's owner, who sees it finish like any job of theirs.
    assert admin_farm.wait_for(new_job["id"], key=user_key, timeout=60)["status"] == "succeeded"
    with admin_farm.client() as client:
        assert client.post(f"/v1/admin/jobs/{new_job['id']}/retry").status_code == 409


@pytest.fixture
def hooked_owner(admin_farm: Farm) -> Iterator[tuple[str, Receiver]]:
    """An owner whose jobs carry a webhook to a verifying receiver, with the farm paused so jobs stay queued."""
    user_key = make_key(admin_farm.env["DATABASE_URL"], f"hooked-{time.monotonic_ns()}")
    with Receiver().running() as receiver:
        with admin_farm.client(user_key) as client:
            receiver.secret = client.get("/v1/webhook-secret").json()["secret"]
        admin(admin_farm, "POST", "/v1/admin/queue/pause")
        try:
            yield user_key, receiver
        finally:
            admin(admin_farm, "POST", "/v1/admin/queue/resume")


def hook_events(receiver: Receiver, job_id: str) -> list[str]:
    bodies = [json.loads(r.body) for r in receiver.received("/hook") if r.verified]
    return sorted(b["event"] for b in bodies if b["id"] == job_id)


HOOKED = TINY | {"webhook_events": ["queued", "canceled", "succeeded"]}


def test_a_dashboard_cancel_sends_the_canceled_webhook(admin_farm: Farm, hooked_owner: tuple[str, Receiver]) -> None:
    user_key, receiver = hooked_owner
    job = admin_farm.submit(HOOKED | {"webhook_url": receiver.url("/hook")}, key=user_key)
    assert admin(admin_farm, "POST", f"/v1/admin/jobs/{job['id']}/cancel")["outcome"] == "canceled"
    wait_until(lambda: hook_events(receiver, job["id"]) == ["canceled", "queued"], 30,
               message="the canceled webhook of the job the admin canceled")


def test_a_retry_keeps_the_webhook_and_sends_queued(admin_farm: Farm, hooked_owner: tuple[str, Receiver]) -> None:
    user_key, receiver = hooked_owner
    job = admin_farm.submit(HOOKED | {"seed": 78, "webhook_url": receiver.url("/hook")}, key=user_key)
    with admin_farm.client(user_key) as client:  # the owner cancels it (that path always sent its webhook)
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    with admin_farm.client() as client:
        retry = client.post(f"/v1/admin/jobs/{job['id']}/retry")
    assert retry.status_code == 202, retry.text
    new_id = retry.json()["job"]["id"]
    wait_until(lambda: hook_events(receiver, new_id) == ["queued"], 30, message="the retry's queued webhook")
    admin(admin_farm, "POST", "/v1/admin/queue/resume")
    assert admin_farm.wait_for(new_id, key=user_key, timeout=60)["status"] == "succeeded"
    wait_until(lambda: hook_events(receiver, new_id) == ["queued", "succeeded"], 30,
               message="the retry's succeeded webhook")


def test_dashboard_in_a_real_browser(admin_farm: Farm, tmp_path: Path) -> None:
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (make install adds it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    user_key = make_key(admin_farm.env["DATABASE_URL"], "a-user")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            expect = sync_api.expect
            page.goto(admin_farm.base_url + "/admin")
            # A non-admin key is refused by the page.
            page.fill("#login-key", user_key)
            page.click("#login-submit")
            expect(page.locator("#login-error")).to_contain_text("not an admin key")
            errors.clear()  # the browser logs the 403 it was shown
            page.fill("#login-key", ADMIN_KEY)
            page.click("#login-submit")
            expect(page.locator("#dashboard")).to_be_visible()
            expect(page.locator("#login")).to_be_hidden()
            assert ADMIN_KEY not in page.url
            assert page.evaluate("sessionStorage.getItem('renderfarm.adminKey')") == ADMIN_KEY

            page.click("#pause-btn")
            expect(page.locator("#pause-badge")).to_contain_text("paused", timeout=10_000)
            n = 4
            ids = [admin_farm.submit(TINY | {"seed": 200 + i, "prompt": f"job {i} <b>bold?</b>"})["id"]
                   for i in range(n)]
            expect(page.locator("#queued-count")).to_have_text(str(n), timeout=15_000)
            expect(page.locator("#broker-waiting")).to_have_text(str(n), timeout=15_000)
            expect(page.locator("#workers-alive")).not_to_have_text("0")
            assert statuses(admin_farm, ids) == ["queued"] * n
            page.wait_for_timeout(3500)  # one more refresh with the charts' samples
            page.screenshot(path=str(tmp_path / "admin-paused.png"), full_page=True)

            page.click("#resume-btn")
            expect(page.locator("#pause-badge")).to_have_text("taking jobs", timeout=10_000)
            expect(page.locator("#queued-count")).to_have_text("0", timeout=60_000)
            expect(page.locator("#running-count")).to_have_text("0", timeout=60_000)
            assert statuses(admin_farm, ids) == ["succeeded"] * n
            # Recent jobs show their thumbnails, and the prompt is text, not markup.
            first_row = page.locator(f'#jobs-table tr[data-job="{ids[-1]}"]')
            expect(first_row.locator("img.thumb")).to_have_count(1, timeout=10_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#jobs-table img.thumb')].some(i => i.naturalWidth > 0)")
            expect(first_row).to_contain_text("<b>bold?</b>")
            page.wait_for_timeout(6500)  # let the stats refresh draw the images just rendered
            page.screenshot(path=str(tmp_path / "admin-drained.png"), full_page=True)
            first_row.click()
            expect(page.locator("#job-dialog")).to_be_visible()
            expect(page.locator("#job-title")).to_contain_text(ids[-1])
            page.screenshot(path=str(tmp_path / "admin-job.png"))
        finally:
            browser.close()
    print(f"screenshots in {tmp_path}")
    assert errors == []
