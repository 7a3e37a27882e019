"""The models catalog: lists with WebUI hashes, architecture from headers, LoRAs at submit.

Hashes are recomputed here with hashlib so the test does not trust the code it checks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from api.model_catalog import (
    checkpoint_architecture,
    list_checkpoints,
    list_embeddings,
    list_loras,
    list_vaes,
    resolve_job_loras,
)
from shared.errors import FieldError
from shared.webui.hashes import HashCache
from tests.conftest import make_key
from tests.farm_harness import Farm

DATA = b"\x01\x02\x03\x04" * 64


def _safetensors(path: Path, tensors: dict[str, list[int]], metadata: dict[str, str] | None = None,
                 data: bytes = DATA) -> Path:
    """A header-correct safetensors file: each tensor is F32 with the given shape, over ``data``."""
    header: dict[str, object] = {key: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
                                 for key, shape in tensors.items()}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _models(root: Path) -> Path:
    _safetensors(root / "Stable-diffusion" / "sd15.safetensors",
                 {"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]})
    _safetensors(root / "Stable-diffusion" / "xl.safetensors",
                 {"conditioner.embedders.1.model.ln_final.weight": [1280],
                  "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]})
    _safetensors(root / "Stable-diffusion" / "tiny.safetensors", {"a": [1]}, {"renderfarm_arch": "demo-tiny"})
    (root / "Stable-diffusion" / "old.ckpt").write_bytes(b"not opened")
    _safetensors(root / "Lora" / "detail.safetensors", {"lora_unet_x.lora_down.weight": [4, 8]},
                 {"ss_output_name": "detail"}, data=b"detail-tensors")
    _safetensors(root / "Lora" / "sub" / "style.safetensors", {"w": [2]}, data=b"style-tensors")
    (root / "Lora" / "evil.pt").write_bytes(b"would be a pickle")
    _safetensors(root / "VAE" / "vae-x.safetensors", {"decoder.w": [3]}, data=b"vae-data")
    _safetensors(root / "embeddings" / "emb.safetensors", {"emb_params": [2, 768]}, data=b"emb-data")
    (root / "embeddings" / "old.bin").write_bytes(b"pickle")
    return root


def _addnet(path: Path) -> str:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + length:]).hexdigest()


def test_architecture_from_crafted_headers(tmp_path: Path) -> None:
    root = _models(tmp_path)
    assert checkpoint_architecture(root / "Stable-diffusion" / "sd15.safetensors") == "sd15"
    assert checkpoint_architecture(root / "Stable-diffusion" / "xl.safetensors") == "sdxl"
    assert checkpoint_architecture(root / "Stable-diffusion" / "tiny.safetensors") == "demo-tiny"
    assert checkpoint_architecture(root / "Stable-diffusion" / "old.ckpt") is None
    assert checkpoint_architecture(_safetensors(tmp_path / "lora.safetensors", {"x.lora_up.weight": [4]})) is None


def test_checkpoint_hashes_and_refusal(tmp_path: Path) -> None:
    root = _models(tmp_path)
    entries = {e.name: e for e in list_checkpoints(root, HashCache())}
    raw = (root / "Stable-diffusion" / "sd15.safetensors").read_bytes()
    assert entries["sd15"].sha256 == hashlib.sha256(raw).hexdigest()
    assert entries["sd15"].hash == hashlib.sha256(raw).hexdigest()[:10]
    assert entries["sd15"].legacy_hash == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert entries["xl"].architecture == "sdxl"
    assert entries["old"].refused_reason and "pickle" in entries["old"].refused_reason
    assert entries["old"].hash is None and entries["old"].architecture is None


def test_lora_vae_embedding_lists(tmp_path: Path) -> None:
    root = _models(tmp_path)
    cache = HashCache()
    loras = {e.name: e for e in list_loras(root, cache)}
    assert loras["detail"].hash == _addnet(root / "Lora" / "detail.safetensors")[:12]
    assert loras["sub/style"].hash == _addnet(root / "Lora" / "sub" / "style.safetensors")[:12]
    assert loras["evil"].hash is None and "pickle" in (loras["evil"].refused_reason or "")
    assert loras["detail"].size == (root / "Lora" / "detail.safetensors").stat().st_size
    vae = list_vaes(root, cache)[0]
    assert vae.hash == hashlib.sha256((root / "VAE" / "vae-x.safetensors").read_bytes()).hexdigest()[:10]
    embeddings = {e.name: e for e in list_embeddings(root, cache)}
    assert embeddings["emb"].hash == hashlib.sha256(
        (root / "embeddings" / "emb.safetensors").read_bytes()).hexdigest()[:12]
    assert embeddings["old"].refused_reason


def test_job_loras_merge_tags_and_field(tmp_path: Path) -> None:
    root = _models(tmp_path)
    found = resolve_job_loras(root, "a cat <lora:detail:0.5>", "<lora:style:0.7> <lora:detail:0.5>",
                              [("sub/style", 0.7), ("detail.safetensors", 0.5)])
    detail = _addnet(root / "Lora" / "detail.safetensors")[:12]
    style = _addnet(root / "Lora" / "sub" / "style.safetensors")[:12]
    assert found == [{"name": "detail", "weight": 0.5, "file": "detail.safetensors", "hash": detail},
                     {"name": "sub/style", "weight": 0.7, "file": "sub/style.safetensors", "hash": style}]


@pytest.mark.parametrize(("prompt", "field_loras", "loc", "message"), [
    ("<lora:nope:1>", [], ("body", "prompt"), "available in models/Lora/: detail.safetensors"),
    ("", [("nope", 1.0)], ("body", "loras", 0, "name"), "unknown LoRA"),
    ("<lora:../VAE/vae-x:1>", [], ("body", "prompt"), "not a name inside"),
    ("", [("/etc/passwd", 1.0)], ("body", "loras", 0, "name"), "not a name inside"),
    ("<lora:evil:1>", [], ("body", "prompt"), "pickle"),
    ("<lora:detail:abc>", [], ("body", "prompt"), "not a number"),
    ("<lora:detail:nan>", [], ("body", "prompt"), "finite"),
    ("<lora:detail:0.5>", [("detail", 0.9)], ("body", "loras", 0, "weight"), "give it once"),
])
def test_job_loras_refusals(tmp_path: Path, prompt: str, field_loras: list, loc: tuple, message: str) -> None:
    root = _models(tmp_path)
    with pytest.raises(FieldError) as info:
        resolve_job_loras(root, prompt, "", field_loras)
    assert info.value.field == loc and message in info.value.message


# --- through the API, with no worker: lists, refresh, and 422s that leave nothing behind ---

VALID = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def farm_loras(api_only: Farm, models_dir: Path) -> Iterator[Path]:
    """Files added to the shared models folder while the API runs, removed afterwards."""
    added = [_safetensors(models_dir / "Lora" / "cat-detail.safetensors", {"w": [2]}, data=b"cat"),
             _safetensors(models_dir / "Lora" / "cat-style.safetensors", {"w": [2]}, data=b"style")]
    yield models_dir
    for path in added + [models_dir / "Lora" / "cat-late.safetensors"]:
        path.unlink(missing_ok=True)


def _counts(farm: Farm) -> tuple[int, int]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    return rows, redis.Redis.from_url(farm.env["REDIS_URL"]).llen("render")


def test_lists_and_refresh(api_only: Farm, farm_loras: Path) -> None:
    with api_only.client() as client:
        models = client.get("/v1/models").json()
        demo = next(m for m in models if m["name"] == "demo-tiny")
        assert demo["architecture"] == "demo-tiny" and len(demo["legacy_hash"]) == 8 and len(demo["hash"]) == 10
        loras = {e["name"]: e for e in client.get("/v1/loras").json()}
        assert loras["cat-detail"]["hash"] == _addnet(farm_loras / "Lora" / "cat-detail.safetensors")[:12]
        assert client.get("/v1/vaes").status_code == 200 and client.get("/v1/embeddings").status_code == 200
        _safetensors(farm_loras / "Lora" / "cat-late.safetensors", {"w": [1]}, data=b"late")
        assert client.post("/v1/models/refresh").status_code == 200
        assert "cat-late" in {e["name"] for e in client.get("/v1/loras").json()}
        resp = client.post("/v1/jobs", json={**VALID, "prompt": "x <lora:cat-late:0.3>"})
        assert resp.status_code == 202, resp.text
    user = make_key(api_only.env["DATABASE_URL"], "catalog-user")
    with api_only.client(user) as client:
        assert client.post("/v1/models/refresh").status_code == 403
        assert client.get("/v1/loras").status_code == 200


@pytest.mark.parametrize(("change", "loc", "message"), [
    ({"prompt": "a <lora:no-such-lora:1>"}, ["body", "prompt"], "cat-detail"),
    ({"loras": [{"name": "no-such-lora"}]}, ["body", "loras", 0, "name"], "cat-detail"),
    ({"loras": [{"name": "../Stable-diffusion/demo-tiny"}]}, ["body", "loras", 0, "name"], "not a name inside"),
    ({"prompt": "a <lora:cat-detail:heavy>"}, ["body", "prompt"], "not a number"),
])
def test_bad_lora_is_422_and_leaves_nothing(api_only: Farm, farm_loras: Path, change: dict, loc: list,
                                            message: str) -> None:
    before = _counts(api_only)
    with api_only.client() as client:
        resp = client.post("/v1/jobs", json={**VALID, **change})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in detail), detail
    assert _counts(api_only) == before


def test_tag_and_field_merged_into_params(api_only: Farm, farm_loras: Path) -> None:
    body = {**VALID, "prompt": "a cat <lora:cat-detail:0.6>", "loras": [{"name": "cat-style", "weight": 0.4}]}
    with api_only.client() as client:
        resp = client.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        params = client.get(f"/v1/jobs/{resp.json()['id']}").json()["params"]
    assert params["prompt"] == "a cat <lora:cat-detail:0.6>"  # the tag stays for the infotext
    assert params["loras"] == [
        {"name": "cat-detail", "weight": 0.6, "file": "cat-detail.safetensors",
         "hash": _addnet(farm_loras / "Lora" / "cat-detail.safetensors")[:12]},
        {"name": "cat-style", "weight": 0.4, "file": "cat-style.safetensors",
         "hash": _addnet(farm_loras / "Lora" / "cat-style.safetensors")[:12]},
    ]
    assert params["vae_hash"] is None


