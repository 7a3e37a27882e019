"""The studio page in a real headless browser (Debian's chromium through Playwright) against a real farm.

A user signs in, builds a prompt with the dictionary's pickers (and finds the conflicting choices impossible),
renders it while the progress bar moves, cancels a job, and reuses settings from the gallery, from a pasted
infotext and from a dropped PNG. The module runs its own farm (API + worker) so its gallery holds only its jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.embedded import EmbeddedPostgres
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env, make_key
from tests.farm_harness import Farm, start_api, start_worker, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("RENDERFARM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("RENDERFARM_SCREENSHOTS", "/tmp/studio-screenshots"))


@pytest.fixture(scope="module")
def studio_farm(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    logs = tmp_path_factory.mktemp("studio-farm")
    env = farm_env(database_url=_fresh_database(postgres, "farm_studio"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY)
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    try:
        farm.procs.append(start_worker(env, logs, name="s1"))
        yield farm
    finally:
        farm.stop()


def dict_input(name: str, value: str) -> str:
    return f'input[name="dict-{name}"][value="{value}"]'


def generate(page: Any) -> None:
    """Click Generate and wait until the progress panel follows the new job."""
    previous = page.get_attribute("#progress-panel", "data-job")
    page.click("#generate-btn")
    page.wait_for_function("(previous) => (document.getElementById('progress-panel').dataset.job ?? null) !== previous",
                           arg=previous)


def job_of(farm: Farm, key: str, job_id: str) -> dict[str, Any]:
    with farm.client(key) as client:
        return client.get(f"/v1/jobs/{job_id}").json()


def jobs_of(farm: Farm, key: str) -> list[dict[str, Any]]:
    with farm.client(key) as client:
        return client.get("/v1/jobs", params={"limit": 50}).json()["jobs"]


def test_studio_in_a_real_browser(studio_farm: Farm) -> None:
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    expect = sync_api.expect
    key = make_key(studio_farm.env["DATABASE_URL"], "studio-user")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(f"{msg.text} {msg.location.get('url')}")
                    if msg.type == "error" else None)

            # Sign in: / leads to the studio; the key lives in sessionStorage, never in the URL.
            page.goto(studio_farm.base_url + "/")
            assert page.url.endswith("/studio")
            page.fill("#login-key", "rf_not_a_key")
            page.click("#login-submit")
            expect(page.locator("#login-error")).to_contain_text("not valid")
            assert page.evaluate("sessionStorage.getItem('renderfarm.apiKey')") is None
            errors.clear()  # the browser logs the 401 it was shown
            page.fill("#login-key", key)
            page.click("#login-submit")
            expect(page.locator("#studio")).to_be_visible()
            assert key not in page.url
            assert page.evaluate("sessionStorage.getItem('renderfarm.apiKey')") == key
            expect(page.locator("#model option")).not_to_have_count(0)

            # Exactly one hair length: picking the second deselects the first.
            page.check(dict_input("hair_length", "long hair"))
            page.check(dict_input("hair_length", "short hair"))
            expect(page.locator(dict_input("hair_length", "long hair"))).not_to_be_checked()
            page.check(dict_input("hair_length", "long hair"))
            expect(page.locator(dict_input("hair_length", "short hair"))).not_to_be_checked()
            # At most two hair colours: with two picked, every other colour is disabled until one is dropped.
            page.check(dict_input("hair_colors", "black"))
            expect(page.locator(dict_input("hair_colors", "blue"))).to_be_enabled()
            page.check(dict_input("hair_colors", "pink"))
            expect(page.locator(dict_input("hair_colors", "blue"))).to_be_disabled()
            expect(page.locator('input[name="dict-hair_colors"]:disabled')).to_have_count(10)
            page.uncheck(dict_input("hair_colors", "pink"))
            expect(page.locator(dict_input("hair_colors", "blue"))).to_be_enabled()
            page.check(dict_input("hair_colors", "pink"))
            # A character decides its own hair: those pickers are locked while it is chosen.
            page.select_option("#dict-base", "character:ahri")
            expect(page.locator('.dict-category[data-key="hair_length"]')).to_have_attribute("disabled", "")
            expect(page.locator('.dict-category[data-key="hair_colors"]')).to_contain_text("set by Ahri")
            expect(page.locator(dict_input("hair_length", "short hair"))).to_be_disabled()
            page.select_option("#dict-base", "")
            expect(page.locator(dict_input("hair_length", "short hair"))).to_be_enabled()
            page.check(dict_input("hair_style", "pony tail"))
            page.check(dict_input("eye_color", "red"))
            page.check(dict_input("expression", "crying"))
            page.check(dict_input("traits", "cat ears"))
            page.select_option("#dict-outfit-color", "pink")
            page.select_option("#dict-outfit-name", "maid uniform")
            # Props: as many as wanted, but the picker says what the notes say, and a build of more than a few
            # warns (and still builds).
            with studio_farm.client(key) as client:
                props_note = client.get("/v1/prompt-dictionary").json()["notes"]["props"]
            assert "more than a few get swallowed" in props_note
            expect(page.locator('.dict-category[data-key="props"] .advice')).to_have_text(f"⚠ {props_note}")
            expect(page.locator('.dict-category[data-key="props"] legend')).not_to_contain_text("any number")
            for prop in ("sunglasses", "gloves", "earrings", "choker"):
                page.check(dict_input("props", prop))
            page.click("#dict-build")
            expect(page.locator("#dict-warnings li")).to_have_text([f"4 props chosen (more than 3): {props_note}"])
            expect(page.locator("#dict-error")).to_have_text("")
            for prop in ("gloves", "earrings", "choker"):
                page.uncheck(dict_input("props", prop))
            # The blend's texts cannot hold the characters of its own syntax.
            page.fill("#blend-from", "you[ng:")
            expect(page.locator("#blend-from")).to_have_value("young")
            page.fill("#blend-to", "old")
            page.locator("#blend-when").fill("0.3")
            expect(page.locator("#blend-preview")).to_have_text("[young:old:0.3]")
            page.click("#dict-build")
            prompt = page.locator("#prompt")
            expect(prompt).to_have_value(re.compile(r"\[young:old:0\.3\],$"))
            expect(prompt).to_have_value(re.compile("two-tone hair, black hair, pink hair, long hair, pony tail"))
            expect(page.locator("#dict-warnings li")).to_have_count(0)  # one prop: nothing to warn about
            built = prompt.input_value()
            for part in ("red eyes, crying, tears", "cat ears", "pink maid uniform", "sunglasses", "[young:old:0.3]"):
                assert part in built, built
            assert page.locator("#negative_prompt").input_value()
            # The same choices and the seed the page shows build the same prompt through the API.
            choices = page.evaluate("import('/studio/static/dictionary.js').then((m) => m.readChoices())")
            seed = int(page.locator("#dict-seed").input_value())
            with studio_farm.client(key) as client:
                again = client.post("/v1/prompts/build", json={"choices": choices, "seed": seed}).json()
            assert again["prompt"] == built

            # Render it and watch the progress move.
            page.fill('input[name="width"]', "256")
            page.fill('input[name="height"]', "256")
            page.fill('input[name="steps"]', "40")
            page.fill("#seed", "4242")
            generate(page)
            expect(page.locator("#job-status")).to_have_text("running", timeout=60_000)
            page.wait_for_function("() => { const p = document.getElementById('job-progress');"
                                   " return p.value > 0 && p.value < 1; }", timeout=60_000)
            expect(page.locator("#job-detail")).to_contain_text("step")
            page.screenshot(path=str(SCREENSHOTS / "studio-progress.png"), full_page=True)
            expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('#output-images img')]"
                                   ".some((i) => i.naturalWidth === 256)")
            expect(page.locator("#output-seed")).to_have_text("4242")
            expect(page.locator("#output-infotext")).to_contain_text("pink maid uniform")
            expect(page.locator("#output-infotext")).to_contain_text("Seed: 4242")
            page.screenshot(path=str(SCREENSHOTS / "studio-done.png"), full_page=True)
            page.fill("#seed", "-1")
            page.click("#seed-reuse")
            expect(page.locator("#seed")).to_have_value("4242")
            page.click("#seed-random")
            expect(page.locator("#seed")).to_have_value("-1")

            # Behind a running job, a job shows its queue position, and Cancel takes it out of the queue.
            busy = studio_farm.submit({"prompt": "busy", "width": 256, "height": 256, "steps": 150}, key=key)["id"]
            wait_until(lambda: job_of(studio_farm, key, busy)["status"] == "running", 60, message="the busy job")
            page.fill('input[name="steps"]', "20")
            generate(page)
            expect(page.locator("#job-status")).to_have_text("queued", timeout=30_000)
            expect(page.locator("#job-detail")).to_contain_text(re.compile(r"queue position \d+"))
            page.click("#cancel-btn")
            expect(page.locator("#job-status")).to_have_text("canceled", timeout=30_000)
            # The running one, found in the gallery and watched, stops when canceled.
            page.click('[data-tab="gallery"]')
            page.locator(f'article[data-job="{busy}"] button', has_text="Watch").click()
            expect(page.locator("#job-status")).to_have_text("running", timeout=30_000)
            page.click("#cancel-btn")
            expect(page.locator("#job-status")).to_have_text("canceled", timeout=60_000)
            assert [job["status"] for job in jobs_of(studio_farm, key)] == ["canceled", "canceled", "succeeded"]

            # A pasted infotext fills the form, legacy sampler names split as the WebUI splits them.
            page.click("#paste-btn")
            page.fill("#paste-text", "a lighthouse\nNegative prompt: fog\n"
                                     "Steps: 7, Sampler: DPM++ SDE Karras, CFG scale: 6.5, Seed: 1234, "
                                     "Size: 320x192, Model: demo-tiny, Clip skip: 2")
            page.click("#paste-apply")
            expect(prompt).to_have_value("a lighthouse")
            expect(page.locator("#negative_prompt")).to_have_value("fog")
            for name, value in (("steps", "7"), ("cfg_scale", "6.5"), ("seed", "1234"), ("width", "320"),
                                ("height", "192"), ("clip_skip", "2")):
                expect(page.locator(f'[name="{name}"]')).to_have_value(value)
            expect(page.locator("#sampler_name")).to_have_value("DPM++ SDE")
            expect(page.locator("#scheduler")).to_have_value("Karras")

            # The gallery: my jobs, newest first, filterable; reuse the finished one's settings.
            page.click('[data-tab="gallery"]')
            cards = page.locator("#gallery-jobs article.job")
            expect(cards).to_have_count(3)
            expect(page.locator("#gallery-range")).to_have_text("1–3 of 3")
            page.select_option("#gallery-model", "demo-tiny")
            expect(cards).to_have_count(3)
            page.select_option("#gallery-status", "succeeded")
            expect(cards).to_have_count(1)
            done = cards.first
            page.wait_for_function("() => [...document.querySelectorAll('.shot img')].some((i) => i.naturalWidth > 0)")
            expect(done.locator("figcaption")).to_contain_text("seed 4242")
            page.screenshot(path=str(SCREENSHOTS / "studio-gallery.png"), full_page=True)
            done.locator("button.reuse").click()
            expect(page.locator("#gen-form")).to_be_visible()
            expect(prompt).to_have_value(built)
            for name, value in (("steps", "40"), ("seed", "4242"), ("width", "256"), ("clip_skip", "1")):
                expect(page.locator(f'[name="{name}"]')).to_have_value(value)

            # A PNG dropped on the page fills the form from its own infotext.
            rendered = next(job for job in jobs_of(studio_farm, key) if job["status"] == "succeeded")
            image_url = rendered["images"][0]["url"]
            png = SCREENSHOTS / "rendered.png"
            png.write_bytes(httpx.get(image_url, timeout=30).content)
            page.fill("#seed", "-1")
            page.set_input_files("#png-file", str(png))
            expect(page.locator("#seed")).to_have_value("4242")

            # Send the image to img2img and render from it.
            page.click('[data-tab="gallery"]')
            page.locator("#gallery-jobs article.job").first.locator("figcaption button").click()
            expect(page.locator("#img2img-panel")).to_be_visible()
            expect(page.locator("#init-preview")).to_be_visible(timeout=30_000)
            expect(page.locator("#hires-panel")).to_be_hidden()
            page.fill('input[name="steps"]', "4")
            page.fill('#img2img-panel input[name="denoising_strength"]', "0.5")
            generate(page)
            expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
            img2img = jobs_of(studio_farm, key)[0]
            assert img2img["mode"] == "img2img" and img2img["params"]["denoising_strength"] == 0.5
            page.screenshot(path=str(SCREENSHOTS / "studio-img2img.png"), full_page=True)

            # Hires fix and a ControlNet unit from their panels.
            page.click('[data-tab="txt2img"]')
            for name, value in (("width", "64"), ("height", "64"), ("steps", "2")):
                page.fill(f'input[name="{name}"]', value)
            page.click("#hires-panel summary")
            page.check("#enable_hr")
            page.select_option("#hr_upscaler", "Latent")
            page.fill('input[name="hr_second_pass_steps"]', "2")
            page.click("#cn-panel summary")
            page.check("#cn-enabled")
            page.select_option("#cn-module", "canny")
            page.select_option("#cn-model", label="demo-tiny-control")
            page.fill("#cn-weight", "0.8")
            page.set_input_files("#cn-image", str(png))
            generate(page)
            expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
            job = jobs_of(studio_farm, key)[0]
            assert job["params"]["enable_hr"] is True and job["params"]["hr_upscaler"] == "Latent", job["params"]
            assert job["images"][0]["width"] == 128
            unit = job["params"]["controlnet"][0]
            assert (unit["module"], unit["model"], unit["weight"]) == ("canny", "demo-tiny-control", 0.8), unit
            page.screenshot(path=str(SCREENSHOTS / "studio-hires-controlnet.png"), full_page=True)

            page.click("#logout-btn")
            expect(page.locator("#login")).to_be_visible()
            assert page.evaluate("sessionStorage.getItem('renderfarm.apiKey')") is None
        finally:
            browser.close()
    print(f"screenshots in {SCREENSHOTS}")
    assert errors == []


STUDIO_DIR = Path(__file__).resolve().parents[2] / "api" / "studio_page"
# Just the gallery's elements (index.html's ids) and its module, on an origin the browser never reaches: every
# request is answered by the test, so the gallery's cards can show jobs of each output format without rendering.
GALLERY_SHELL = """<!doctype html><meta charset="utf-8">
<select id="gallery-status"><option value="">all</option></select>
<select id="gallery-model"><option value="">all</option></select>
<button id="gallery-prev"></button><span id="gallery-range"></span><button id="gallery-next"></button>
<div id="gallery-jobs"></div>
<script type="module">
  import { setupGallery, showGallery } from "/studio/static/gallery.js";
  setupGallery({});
  showGallery();
</script>"""


def _serve_gallery(route: Any, origin: str, shell: str, jobs: Callable[[Any, str], None]) -> None:
    """Answer the browser's request: the gallery's shell, the studio's modules from disk, `/v1/jobs` by ``jobs``
    (given the route and the request's URL without the origin), anything else 404."""
    url = route.request.url.removeprefix(origin)
    path = url.split("?")[0]
    static = STUDIO_DIR / path.removeprefix("/studio/static/")
    if path == "/gallery":
        route.fulfill(status=200, content_type="text/html", body=shell)
    elif path.startswith("/studio/static/") and static.is_file():
        route.fulfill(status=200, content_type="text/javascript", body=static.read_text(encoding="utf-8"))
    elif path == "/v1/jobs":
        jobs(route, url)
    else:
        route.fulfill(status=404, body="")


def test_gallery_downloads_are_named_with_the_jobs_output_format() -> None:
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    origin = "http://studio.test"

    def job(job_id: str, **params: Any) -> dict[str, Any]:
        return {"id": job_id, "status": "succeeded", "created_at": "2024-05-01T12:00:00Z", "mode": "txt2img",
                "model": "demo-tiny", "error": None, "params": {"prompt": "a lighthouse", **params},
                "images": [{"index": i, "seed": 7 + i, "url": f"/images/{job_id}-{i}", "infotext": "a lighthouse"}
                           for i in range(2)]}

    jobs = [job("j-webp", output_format="webp"), job("j-jpeg", output_format="jpeg"),
            job("j-png", output_format="png"), job("j-older")]  # a job stored before output_format: a PNG
    errors: list[str] = []

    def answer(route: Any) -> None:
        _serve_gallery(route, origin, GALLERY_SHELL, lambda route, _url: route.fulfill(
            status=200, content_type="application/json", body=json.dumps({"jobs": jobs, "total": len(jobs)})))

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.route(f"{origin}/**", answer)
            page.goto(f"{origin}/gallery")
            links = page.locator("#gallery-jobs figcaption a[download]")
            sync_api.expect(links).to_have_count(8)
            names = [links.nth(i).get_attribute("download") for i in range(8)]
        finally:
            browser.close()
    assert names == ["j-webp-0.webp", "j-webp-1.webp", "j-jpeg-0.jpeg", "j-jpeg-1.jpeg",
                     "j-png-0.png", "j-png-1.png", "j-older-0.png", "j-older-1.png"]
    assert errors == []


def test_a_slow_answer_to_an_earlier_filter_does_not_replace_the_newer_one() -> None:
    """Two filters chosen in quick succession: the first answer arrives last and must not be what the gallery shows."""
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    origin = "http://studio.test"
    shell = (GALLERY_SHELL
             .replace('<option value="">all</option></select>\n<select id="gallery-model">',
                      '<option value="">all</option><option>succeeded</option></select>\n<select id="gallery-model">')
             .replace('<select id="gallery-model"><option value="">all</option>',
                      '<select id="gallery-model"><option value="">all</option><option>demo-tiny</option>'))

    def job(job_id: str, status: str) -> dict[str, Any]:
        return {"id": job_id, "status": status, "created_at": "2024-05-01T12:00:00Z", "mode": "txt2img",
                "model": "demo-tiny", "error": None, "params": {"prompt": job_id}, "images": []}

    every = [job("a", "canceled"), job("b", "canceled"), job("c", "succeeded")]
    held: list[Any] = []
    errors: list[str] = []

    def jobs(route: Any, url: str) -> None:
        if "model=" in url and "status=" not in url:
            held.append(route)  # the model filter's answer: held back until the status filter's has been shown
            return
        shown = [j for j in every if "status=succeeded" not in url or j["status"] == "succeeded"]
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"jobs": shown, "total": len(shown)}))

    def answer(route: Any) -> None:
        _serve_gallery(route, origin, shell, jobs)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.route(f"{origin}/**", answer)
            page.goto(f"{origin}/gallery")
            cards = page.locator("#gallery-jobs article.job")
            sync_api.expect(cards).to_have_count(3)
            page.select_option("#gallery-model", "demo-tiny")
            page.select_option("#gallery-status", "succeeded")
            sync_api.expect(cards).to_have_count(1)
            for _ in range(100):  # the route handler runs while playwright is called
                if held:
                    break
                page.wait_for_timeout(50)
            assert held, "the model filter's request never came"
            held[0].fulfill(status=200, content_type="application/json",
                            body=json.dumps({"jobs": every, "total": len(every)}))
            page.wait_for_timeout(500)  # the late answer has arrived and been handled (or dropped)
            sync_api.expect(cards).to_have_count(1)
            sync_api.expect(page.locator("#gallery-range")).to_have_text("1–1 of 1")
        finally:
            browser.close()
    assert errors == []
