"""The shared model store with real workers (issue 19): two workers with separate, empty models folders and one
object store. A checkpoint and LoRAs uploaded through the API are listed at once and render on either worker;
a worker killed mid-download leaves nothing half-written and its job still succeeds once; a second job on the
same worker downloads nothing; a corrupted stored file is refused by hash, the job failing with the file's name;
the disk cache evicts the least recently used file under its budget.

Pulls are held to 2 MB/s here (RENDERFARM_MODEL_PULL_BYTES_PER_SECOND), so the 8 MB demo checkpoint takes about
four seconds to download: long enough to see the phase and to kill a worker in the middle of it."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image

from devtools.embedded import EmbeddedPostgres
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env, make_key
from tests.farm_harness import ROOT, Farm, Proc, start_api, start_worker, wait_until

pytestmark = pytest.mark.e2e

CKPT = "Stable-diffusion/demo-tiny.safetensors"
JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler", "seed": 3}


@pytest.fixture(scope="module")
def source_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the test uploads: the demo checkpoint and three demo LoRAs, built by the project's builders."""
    path = tmp_path_factory.mktemp("upload-source")
    for module, args in (("devtools.demo_models.sd15", []), ("devtools.demo_models.lora_sd15", ["3"]),
                         ("devtools.demo_models.controlnet", []), ("devtools.demo_models.upscalers", [])):
        subprocess.run([sys.executable, "-m", module, str(path), *args], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return path


class StoreFarm(Farm):
    folders: dict[str, Path]
    logs: Path

    def start(self, name: str) -> Proc:
        env = dict(self.env, RENDERFARM_MODELS_DIR=str(self.folders[name]))
        proc = start_worker(env, self.logs, name=name)
        self.procs.append(proc)
        return proc

    def upload(self, path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
        with self.client() as client, open(path, "rb") as file:
            resp = client.post("/v1/models", data={"kind": kind, **({"name": name} if name else {})},
                               files={"file": (path.name, file, "application/octet-stream")})
        assert resp.status_code == 201, resp.text
        return resp.json()

    def worker_of(self, job_id: str) -> str:
        engine = sa.create_engine(self.env["DATABASE_URL"])
        with engine.connect() as conn:
            owner = conn.execute(sa.text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
        engine.dispose()
        assert owner, job_id
        return str(owner).split(":")[0]


@pytest.fixture(scope="module")
def store_farm(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str],
               tmp_path_factory: pytest.TempPathFactory, source_models: Path) -> Iterator[StoreFarm]:
    logs = tmp_path_factory.mktemp("store-farm")
    folders = {name: logs / f"models-{name}" for name in ("api", "w1", "w2")}
    for folder in folders.values():
        folder.mkdir()
    ckpt_size = (source_models / CKPT).stat().st_size
    lora_size = (source_models / "Lora" / "demo-lora-0.safetensors").stat().st_size
    env = farm_env(database_url=_fresh_database(postgres, "farm_model_store"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=folders["api"], admin_key=ADMIN_KEY,
                   RENDERFARM_MODEL_PULL_BYTES_PER_SECOND=str(2 * 1024 * 1024),
                   # the checkpoint and one LoRA fit; a second LoRA evicts the least recently used one
                   RENDERFARM_MODEL_DISK_CACHE_BYTES=str(ckpt_size + lora_size + lora_size // 2),
                   RENDERFARM_AFFINITY_MAX_WAIT_SECONDS="2",
                   RENDERFARM_MODEL_IMPORT_ALLOW_HOSTS="127.0.0.1")  # the test's file server; 10.x stays refused
    api, base_url = start_api(env, logs)
    farm = StoreFarm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    farm.folders, farm.logs = folders, logs
    try:
        farm.start("w1")
        farm.start("w2")
        yield farm
    finally:
        farm.stop()


def _index(folder: Path) -> dict[str, Any]:
    path = folder / ".pulled" / "index.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_uploaded_models_render_on_either_worker_and_a_killed_download_loses_nothing(
        store_farm: StoreFarm, source_models: Path) -> None:
    farm = store_farm
    with farm.client() as client:
        assert client.get("/v1/models").json() == []  # every folder is empty
    ckpt = farm.upload(source_models / CKPT, "checkpoint")
    lora = farm.upload(source_models / "Lora" / "demo-lora-0.safetensors", "lora", name="ink.safetensors")
    assert ckpt["file"] == CKPT and ckpt["architecture"] and ckpt["stored"]
    with farm.client() as client:  # listed at once, by the farm's lists and the WebUI's
        assert [m["name"] for m in client.get("/v1/models").json()] == ["demo-tiny"]
        assert client.get("/v1/models").json()[0]["hash"] == ckpt["sha256"][:10]
        assert [entry["name"] for entry in client.get("/v1/loras").json()] == ["ink"]
        assert [entry["name"] for entry in client.get("/sdapi/v1/loras").json()] == ["ink"]
        assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["demo-tiny"]

    first = farm.submit(JOB | {"prompt": "a lighthouse <lora:ink:0.8>"})["id"]
    with farm.client() as client:
        def downloading() -> bool:
            view = client.get(f"/v1/jobs/{first}").json()
            assert view["status"] in ("queued", "running"), view.get("error")
            return view.get("phase") == "downloading"

        wait_until(downloading, 60, interval=0.05, message="the job to show its download")
        view = client.get(f"/v1/jobs/{first}").json()
    assert view["status"] == "running", view
    killed = farm.worker_of(first)
    os.killpg(next(p for p in farm.procs if p.name == killed).popen.pid, signal.SIGKILL)  # parent and child
    assert not (farm.folders[killed] / CKPT).exists()  # a partial download is never visible

    done = farm.wait_for(first, timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 2 and len(done["images"]) == 1
    survivor = farm.worker_of(first)
    assert survivor != killed
    pulled = _index(farm.folders[survivor])
    assert set(pulled) == {CKPT, "Lora/ink.safetensors"}
    assert pulled[CKPT]["sha256"] == ckpt["sha256"] and pulled["Lora/ink.safetensors"]["sha256"] == lora["sha256"]
    inode = (farm.folders[survivor] / CKPT).stat().st_ino

    second = farm.submit(JOB | {"prompt": "a harbour <lora:ink:0.8>", "seed": 4})["id"]
    assert farm.wait_for(second)["status"] == "succeeded"
    assert farm.worker_of(second) == survivor  # it holds the model warm
    assert (farm.folders[survivor] / CKPT).stat().st_ino == inode  # not downloaded again
    assert next(p for p in farm.procs if p.name == survivor).log().count("pulled ") == 2  # the checkpoint, ink

    # The killed worker comes back with the same folder: the half download is discarded, the checkpoint pulled
    # whole; then it renders the next job alone (the other worker stopped), pulling only the new LoRA.
    farm.procs = [p for p in farm.procs if p.name != killed]
    farm.start(killed)
    next(p for p in farm.procs if p.name == survivor).stop()
    farm.upload(source_models / "Lora" / "demo-lora-1.safetensors", "lora", name="wash.safetensors")
    third = farm.submit(JOB | {"prompt": "a harbour <lora:wash:1>", "seed": 5})["id"]
    assert farm.wait_for(third, timeout=120)["status"] == "succeeded"
    assert farm.worker_of(third) == killed
    folder = farm.folders[killed]
    assert not list((folder / ".pulled" / "partial").glob("*"))
    # Under the byte budget (the checkpoint and one LoRA and a half), the least recently used LoRA goes.
    assert set(_index(folder)) == {CKPT, "Lora/wash.safetensors"}
    fourth = farm.submit(JOB | {"prompt": "a harbour <lora:ink:1>", "seed": 6})["id"]
    assert farm.wait_for(fourth, timeout=120)["status"] == "succeeded"
    assert set(_index(folder)) == {CKPT, "Lora/ink.safetensors"}
    assert not (folder / "Lora" / "wash.safetensors").exists()


def test_a_corrupted_stored_file_is_refused_by_hash_and_the_job_names_it(store_farm: StoreFarm,
                                                                         source_models: Path) -> None:
    farm = store_farm
    entry = farm.upload(source_models / "Lora" / "demo-lora-2.safetensors", "lora", name="rust.safetensors")
    stored = farm.logs / "objects" / "models" / "sha256" / entry["sha256"]
    assert stored.is_file()
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    job = farm.submit(JOB | {"prompt": "a harbour <lora:rust:1>", "seed": 7})["id"]
    done = farm.wait_for(job, timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "storage_error"
    assert "Lora/rust.safetensors" in done["error"]["message"] and "sha256" in done["error"]["message"]
    for name in ("w1", "w2"):
        assert not (farm.folders[name] / "Lora" / "rust.safetensors").exists()


def test_uploads_are_checked_before_anything_is_stored(store_farm: StoreFarm, tmp_path: Path,
                                                       source_models: Path) -> None:
    farm = store_farm
    objects = farm.logs / "objects" / "models" / "sha256"
    before = sorted(p.name for p in objects.iterdir()) if objects.exists() else []
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04would run code")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with farm.client() as client:
        for path, kind, field in ((pickle, "lora", "file"), (broken, "lora", "file"),
                                  (source_models / "Lora" / "demo-lora-0.safetensors", "checkpoint", "file")):
            with open(path, "rb") as file:
                resp = client.post("/v1/models", data={"kind": kind}, files={"file": (path.name, file)})
            assert resp.status_code == 422, resp.text
            assert resp.json()["detail"][0]["loc"] == ["body", field], resp.text
        with open(broken, "rb") as file:
            resp = client.post("/v1/models", data={"kind": "textual"}, files={"file": ("x.safetensors", file)})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "kind"]
        with open(source_models / "Lora" / "demo-lora-0.safetensors", "rb") as file:
            resp = client.post("/v1/models", data={"kind": "lora", "name": "ink.safetensors"},
                               files={"file": ("x.safetensors", file)})
        assert resp.status_code == 200, resp.text  # the same bytes under the same name: nothing new
        with open(source_models / "Lora" / "demo-lora-1.safetensors", "rb") as file:
            resp = client.post("/v1/models", data={"kind": "lora", "name": "ink.safetensors"},
                               files={"file": ("x.safetensors", file)})
        assert resp.status_code == 409, resp.text
    assert (sorted(p.name for p in objects.iterdir()) if objects.exists() else []) == before


@pytest.fixture
def file_server(source_models: Path) -> Iterator[str]:
    """An HTTP server on loopback serving the demo files, with redirects: /to/<path> answers 302 to /<path>,
    /private answers 302 to a private address."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(source_models), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            if self.path.startswith("/to/"):
                self.send_response(302)
                self.send_header("Location", self.path[3:])
                self.end_headers()
            elif self.path == "/private":
                self.send_response(302)
                self.send_header("Location", "http://10.1.2.3/x.safetensors")
                self.end_headers()
            else:
                super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_operator_imports_from_a_url_behind_the_ssrf_guard(store_farm: StoreFarm, file_server: str,
                                                              source_models: Path) -> None:
    farm = store_farm
    lora = source_models / "Lora" / "demo-lora-1.safetensors"
    with farm.client() as client:
        resp = client.post("/v1/models/import", json={"url": f"{file_server}/to/Lora/demo-lora-1.safetensors",
                                                      "kind": "lora"})
        assert resp.status_code == 201, resp.text  # followed the redirect, named after the file
        entry = resp.json()
        assert entry["file"] == "Lora/demo-lora-1.safetensors" and entry["source"] == "url"
        assert entry["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
        assert "demo-lora-1" in [e["name"] for e in client.get("/v1/loras").json()]
        for url, reason in (("http://10.1.2.3/x.safetensors", "private"), (f"{file_server}/private", "private"),
                            ("file:///etc/passwd", "http or https"), (f"{file_server}/missing.safetensors", "404")):
            resp = client.post("/v1/models/import", json={"url": url, "kind": "lora", "name": "x.safetensors"})
            assert resp.status_code == 422, resp.text
            detail = resp.json()["detail"][0]
            assert detail["loc"] == ["body", "url"] and reason in detail["msg"], detail
        resp = client.post("/v1/models/import", json={"url": f"{file_server}/Lora/demo-lora-0.safetensors",
                                                      "kind": "embedding"})
        assert resp.status_code == 422 and "embedding" in resp.text, resp.text  # a LoRA is not an embedding
    key = make_key(farm.env["DATABASE_URL"], "painter")
    with farm.client(key) as client:
        resp = client.post("/v1/models/import", json={"url": f"{file_server}/Lora/demo-lora-0.safetensors",
                                                      "kind": "lora"})
        assert resp.status_code == 403, resp.text
    with farm.client() as client:
        names = [e["name"] for e in client.get("/v1/models/files", params={"kind": "lora"}).json()]
    assert "x.safetensors" not in names


def test_a_resumable_upload_survives_a_dropped_chunk_and_leaves_nothing_behind(store_farm: StoreFarm,
                                                                                 source_models: Path) -> None:
    farm = store_farm
    data = (source_models / CKPT).read_bytes()
    chunk = 3 * 1024 * 1024
    uploads = farm.logs / "objects" / "model-uploads"
    with farm.client() as client:
        for body, field in (({"kind": "checkpoint", "name": "big.safetensors", "size": 0}, "size"),
                            ({"kind": "textual", "name": "big.safetensors", "size": 10}, "kind"),
                            ({"kind": "checkpoint", "name": "big.ckpt", "size": 10}, "name")):
            resp = client.post("/v1/models/uploads", json=body)
            assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", field], resp.text
        resp = client.post("/v1/models/uploads", json={"kind": "checkpoint", "name": "big.safetensors",
                                                       "size": len(data)})
        assert resp.status_code == 201, resp.text
        upload = resp.json()["id"]
        resp = client.patch(f"/v1/models/uploads/{upload}", content=data[:chunk], headers={"Upload-Offset": "0"})
        assert resp.status_code == 200 and resp.headers["Upload-Offset"] == str(chunk), resp.text
        resp = client.patch(f"/v1/models/uploads/{upload}", content=data[:chunk], headers={"Upload-Offset": "0"})
        assert resp.status_code == 409 and resp.headers["Upload-Offset"] == str(chunk), resp.text  # sent twice

        def dropped() -> Iterator[bytes]:
            yield data[chunk:chunk + 1024 * 1024]
            raise ConnectionError("the link dropped")

        with pytest.raises(ConnectionError):
            client.patch(f"/v1/models/uploads/{upload}", content=dropped(), headers={"Upload-Offset": str(chunk)})
        wait_until(lambda: client.get(f"/v1/models/uploads/{upload}").json()["offset"] == chunk, 10)
        with farm.client(make_key(farm.env["DATABASE_URL"], "stranger")) as stranger:
            assert stranger.get(f"/v1/models/uploads/{upload}").status_code in (403, 404)
        offset = client.get(f"/v1/models/uploads/{upload}").json()["offset"]
        while offset < len(data):
            resp = client.patch(f"/v1/models/uploads/{upload}", content=data[offset:offset + chunk],
                                headers={"Upload-Offset": str(offset)})
            offset += len(data[offset:offset + chunk])
        assert resp.status_code == 201, resp.text
        entry = resp.json()
        assert entry["file"] == "Stable-diffusion/big.safetensors" and entry["architecture"]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert "big" in [m["name"] for m in client.get("/v1/models").json()]
        assert client.get(f"/v1/models/uploads/{upload}").status_code == 404
        assert not uploads.exists() or not list(uploads.rglob("*.*"))

        junk = b"\x80\x04not a safetensors file at all" * 100
        upload = client.post("/v1/models/uploads", json={"kind": "lora", "name": "junk.safetensors",
                                                         "size": len(junk)}).json()["id"]
        resp = client.patch(f"/v1/models/uploads/{upload}", content=junk, headers={"Upload-Offset": "0"})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "file"], resp.text
        assert client.get(f"/v1/models/uploads/{upload}").status_code == 404  # refused: nothing kept
        assert "junk" not in [e["name"] for e in client.get("/v1/loras").json()]
    assert not list(uploads.rglob("*.*"))


def test_an_uploaded_controlnet_steers_a_render_on_a_worker_that_lacked_it(store_farm: StoreFarm,
                                                                           source_models: Path) -> None:
    farm = store_farm
    entry = farm.upload(source_models / "ControlNet" / "demo-tiny-control.safetensors", "controlnet")
    assert entry["file"] == "ControlNet/demo-tiny-control.safetensors" and entry["architecture"] == "demo-tiny"
    with farm.client() as client:
        (listed,) = [m for m in client.get("/v1/controlnet/models").json() if m["name"] == "demo-tiny-control"]
        assert listed["loadable"] and listed["title"] == f"demo-tiny-control [{entry['legacy_hash']}]"
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), "white").save(buffer, "PNG")
        unit = {"module": "none", "model": listed["title"], "image": base64.b64encode(buffer.getvalue()).decode()}
        job = client.post("/v1/jobs", json=JOB | {"seed": 8, "controlnet": [unit]}).json()["id"]
    done = farm.wait_for(job, timeout=120)
    assert done["status"] == "succeeded", done
    folder = farm.folders[farm.worker_of(job)]
    assert _index(folder)["ControlNet/demo-tiny-control.safetensors"]["sha256"] == entry["sha256"]
    assert "ControlNet 0" in done["images"][0]["infotext"]


def test_an_uploaded_upscaler_pickle_is_read_by_its_opcodes_and_pulled_for_an_upscale_job(
        store_farm: StoreFarm, source_models: Path, tmp_path: Path) -> None:
    from devtools.demo_models.upscalers import write_booby_trapped_pth

    farm = store_farm
    entry = farm.upload(source_models / "ESRGAN" / "4x-demo-realesrgan.pth", "upscaler")  # no folder: ESRGAN/
    assert entry["file"] == "ESRGAN/4x-demo-realesrgan.pth"
    marker = tmp_path / "ran"
    trap = write_booby_trapped_pth(tmp_path / "trap.pth", marker)
    with farm.client() as client:
        assert "4x-demo-realesrgan" in [u["name"] for u in client.get("/v1/upscalers").json()]
        with open(trap, "rb") as file:
            resp = client.post("/v1/models", data={"kind": "upscaler"}, files={"file": ("trap.pth", file)})
        assert resp.status_code == 422 and "weights-only" in resp.text, resp.text
        with open(trap, "rb") as file:  # a pickle is an upscaler's format only
            resp = client.post("/v1/models", data={"kind": "lora"}, files={"file": ("trap.pth", file)})
        assert resp.status_code == 422 and "pickles" in resp.text, resp.text
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), "gray").save(buffer, "PNG")
        job = client.post("/v1/jobs", json={"mode": "upscale", "image": base64.b64encode(buffer.getvalue()).decode(),
                                            "upscaler_1": "4x-demo-realesrgan", "upscaling_resize": 2})
        assert job.status_code == 202, job.text
    done = farm.wait_for(job.json()["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert (done["images"][0]["width"], done["images"][0]["height"]) == (64, 64)
    assert "ESRGAN/4x-demo-realesrgan.pth" in _index(farm.folders[farm.worker_of(done["id"])])
    assert not marker.exists()


def _webui_hypernetwork(path: Path) -> Path:
    """A hypernetwork in the WebUI's own format (modules/hypernetworks/hypernetwork.py save): per context width
    (the demo model's: 32 for its text and first blocks, 64 for the next), two modules of linear layers, with the
    layer settings beside them; random weights, so it changes a render."""
    import torch

    generator = torch.Generator().manual_seed(7)

    def module(width: int) -> dict[str, torch.Tensor]:
        return {"linear.0.weight": torch.randn(width * 2, width, generator=generator) * 0.3,
                "linear.0.bias": torch.zeros(width * 2),
                "linear.1.weight": torch.randn(width, width * 2, generator=generator) * 0.3,
                "linear.1.bias": torch.zeros(width)}

    torch.save({32: [module(32), module(32)], 64: [module(64), module(64)], "layer_structure": [1, 2, 1],
                "activation_func": "linear", "is_layer_norm": False, "weight_initialization": "Normal",
                "use_dropout": False, "name": path.stem, "step": 0, "sd_checkpoint": None,
                "sd_checkpoint_name": None}, path)
    return path


def test_a_hypernetwork_is_stored_listed_pulled_and_applied(store_farm: StoreFarm,
                                                                              tmp_path: Path) -> None:
    from devtools.demo_models.upscalers import write_booby_trapped_pth

    farm = store_farm
    entry = farm.upload(_webui_hypernetwork(tmp_path / "anime-shading.pt"), "hypernetwork")
    assert entry["file"] == "hypernetworks/anime-shading.pt"
    marker = tmp_path / "ran"
    trap = write_booby_trapped_pth(tmp_path / "trap.pt", marker)
    with farm.client() as client:
        assert [h["name"] for h in client.get("/sdapi/v1/hypernetworks").json()] == ["anime-shading"]
        (listed,) = client.get("/v1/hypernetworks").json()
        assert listed["file"] == "anime-shading.pt" and listed["hash"] == entry["sha256"][:10]
        with open(trap, "rb") as file:
            resp = client.post("/v1/models", data={"kind": "hypernetwork"}, files={"file": ("trap.pt", file)})
        assert resp.status_code == 422 and "weights-only" in resp.text, resp.text
    assert not marker.exists()
    jobs = [farm.submit(JOB | {"prompt": f"a harbour{tag}", "seed": 9})["id"]
            for tag in ("", " <hypernet:anime-shading:0.8>", " <hypernet:anime-shading:0>")]
    plain, shaded, zero = (farm.wait_for(job, timeout=120) for job in jobs)
    assert [j["status"] for j in (plain, shaded, zero)] == ["succeeded"] * 3, (plain, shaded, zero)
    pulled = _index(farm.folders[farm.worker_of(jobs[1])])["hypernetworks/anime-shading.pt"]
    assert pulled["sha256"] == entry["sha256"]
    pixels = [_pixels(farm, job) for job in (plain, shaded, zero)]
    assert (pixels[0] != pixels[1]).any()  # the hypernetwork steers the keys and values
    assert (pixels[0] == pixels[2]).all()  # multiplier 0: each module is x + 0
    assert "<hypernet:anime-shading:0.8>" in shaded["images"][0]["infotext"]
    with farm.client() as client:
        resp = client.post("/v1/jobs", json=JOB | {"prompt": "a harbour <hypernet:nowhere:1>"})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "prompt"], resp.text


def _pixels(farm: StoreFarm, job: dict[str, Any]) -> Any:
    import numpy as np

    with farm.client() as client:
        data = client.get(job["images"][0]["url"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_uploaded_embedding_is_listed_by_the_webui_api_with_its_vectors(store_farm: StoreFarm,
                                                                           tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "bad-hands.safetensors"
    save_file({"emb_params": torch.zeros(3, 768)}, str(path))
    farm = store_farm
    farm.upload(path, "embedding")
    with farm.client() as client:
        loaded = client.get("/sdapi/v1/embeddings").json()["loaded"]
        assert loaded["bad-hands"]["vectors"] == 3 and loaded["bad-hands"]["shape"] == 768, loaded
        (ink,) = [entry for entry in client.get("/sdapi/v1/loras").json() if entry["name"] == "ink"]
        assert ink["metadata"] == {"format": "pt"}  # the registry's copy of the header's metadata
        job = client.post("/v1/jobs", json=JOB | {"prompt": "a harbour, bad-hands", "seed": 10}).json()["id"]
    assert farm.wait_for(job, timeout=120)["status"] == "succeeded"
    assert "embeddings/bad-hands.safetensors" in _index(farm.folders[farm.worker_of(job)])


def test_a_file_that_cannot_be_pulled_fails_only_the_jobs_of_a_batch_that_need_it(store_farm: StoreFarm,
                                                                                  tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    farm = store_farm
    path = tmp_path / "rotten-style.safetensors"
    save_file({"emb_params": torch.ones(2, 768)}, str(path))
    entry = farm.upload(path, "embedding")
    stored = farm.logs / "objects" / "models" / "sha256" / entry["sha256"]
    stored.write_bytes(stored.read_bytes()[:-4] + b"\0\0\0\0")
    with farm.client() as client:
        assert client.post("/v1/admin/queue/pause").status_code == 200
        try:
            rotten = client.post("/v1/jobs", json=JOB | {"prompt": "a harbour, rotten-style", "seed": 11}).json()
            fine = client.post("/v1/jobs", json=JOB | {"prompt": "a harbour at noon", "seed": 12}).json()
        finally:
            assert client.post("/v1/admin/queue/resume").status_code == 200
    failed, done = farm.wait_for(rotten["id"], timeout=120), farm.wait_for(fine["id"], timeout=120)
    assert failed["status"] == "failed" and failed["error"]["type"] == "storage_error", failed
    assert "embeddings/rotten-style.safetensors" in failed["error"]["message"]
    assert done["status"] == "succeeded", done
    assert done["batch_id"] == failed["batch_id"] is not None  # they were claimed together
