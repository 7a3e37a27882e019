"""The model store's registry, object transfers and pulls against real Postgres, the local store and moto's S3
(issue 19); the end-to-end path with workers is tests/e2e/test_e2e_model_store.py."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from devtools.embedded import EmbeddedPostgres
from shared.jobs.contract import LoraSpec, RenderSpec
from shared.models.files import list_model_files
from shared.models.registry import resolve_checkpoint, scan_checkpoints
from shared.models.store_files import add_file, delete_file, one_registration, register_folder, rename_file
from shared.models.store_registry import (
    NameTakenError,
    RegistryView,
    activate,
    describe_file,
    find_row,
    list_records,
    object_key,
    register,
)
from shared.storage.base import ObjectNotFoundError
from shared.storage.local import LocalObjectStore
from shared.storage.s3 import S3ObjectStore
from tests.conftest import _fresh_database
from tests.farm_harness import ROOT
from worker.model_pull.puller import ModelPuller, ModelPullError

LORA = "Lora/demo-lora-0.safetensors"
CKPT = "Stable-diffusion/demo-tiny.safetensors"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store-source")
    for module, args in (("devtools.demo_models.sd15", []), ("devtools.demo_models.lora_sd15", ["2"])):
        subprocess.run([sys.executable, "-m", module, str(path), *args], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return path


@pytest.fixture
def factory(postgres: EmbeddedPostgres) -> Iterator[sessionmaker[Session]]:
    engine = sa.create_engine(_fresh_database(postgres, "farm_model_store_it"))
    yield sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def view() -> Iterator[None]:
    yield
    activate(None)


def test_several_processes_registering_one_folder_at_once_agree(factory: sessionmaker[Session],
                                                               source: Path) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            register_folder(factory, source, None)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with factory() as session:
        records = list_records(session)
    assert sorted(r.relpath for r in records) == ["Lora/demo-lora-0.safetensors", "Lora/demo-lora-1.safetensors",
                                                   "Stable-diffusion/demo-tiny.safetensors"]
    checkpoint = next(r for r in records if r.kind == "checkpoint")
    assert checkpoint.architecture and len(checkpoint.short_hash) == 10 and not checkpoint.stored
    assert all(r.lora_hash for r in records if r.kind == "lora")


def test_add_rename_delete_keep_the_registry_and_the_store_consistent(factory: sessionmaker[Session],
                                                                      source: Path, tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects", "http://test", b"secret")
    with factory() as session:
        first, created = add_file(session, store, source / LORA, "lora", "ink.safetensors", source="upload",
                                  added_by="alice")
        assert created and first.stored and store.exists(object_key(first.sha256))
        again, created = add_file(session, store, source / LORA, "lora", "ink.safetensors", source="upload",
                                  added_by="alice")
        assert not created and again.id == first.id
        with pytest.raises(NameTakenError):
            add_file(session, store, source / "Lora/demo-lora-1.safetensors", "lora", "ink.safetensors",
                     source="upload", added_by="alice")
        twin, _ = add_file(session, store, source / LORA, "lora", "twin.safetensors", source="upload",
                           added_by="bob")  # the same bytes under a second name: stored once
        renamed = rename_file(session, find_row(session, "lora", "ink.safetensors"), "styles/ink.safetensors")
        assert renamed.relpath == "Lora/styles/ink.safetensors"
        with pytest.raises(NameTakenError):
            rename_file(session, find_row(session, "lora", "twin.safetensors"), "styles/ink.safetensors")
        delete_file(session, store, find_row(session, "lora", "styles/ink.safetensors"))
        assert store.exists(object_key(first.sha256))  # twin still names those bytes
        delete_file(session, store, find_row(session, "lora", "twin.safetensors"))
        assert not store.exists(object_key(twin.sha256))
        assert list_records(session) == []


def test_lists_show_registered_files_this_machine_lacks(factory: sessionmaker[Session], source: Path,
                                                        tmp_path: Path, view: None) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    with factory() as session:
        add_file(session, None, source / LORA, "lora", "ink.safetensors", source="upload", added_by="alice")
    assert list_model_files(empty, "Lora") == []  # no view active: the folder alone
    registry = RegistryView.of_database(empty, factory, ttl=60)
    activate(registry)
    assert list_model_files(empty, "Lora") == [("ink.safetensors", None)]
    with factory() as session:
        add_file(session, None, source / "Lora/demo-lora-1.safetensors", "lora", "wash.safetensors",
                 source="upload", added_by="alice")  # this process's view is refreshed at once by its own change
    assert [name for name, _ in list_model_files(empty, "Lora")] == ["ink.safetensors", "wash.safetensors"]
    # Another process adds a file: this view shows it after its TTL, but a job naming it resolves at once.
    with factory() as session:
        register(session, describe_file(source / CKPT, "checkpoint", "fresh.safetensors", source="upload",
                                        added_by="bob"))
        session.commit()
    assert "fresh" not in [c.name for c in scan_checkpoints(empty)]
    assert resolve_checkpoint(empty, "fresh").name == "fresh"


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_files_go_to_the_store_and_back_streamed(backend: str, source: Path, tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    if backend == "s3":
        store = S3ObjectStore("renderfarm-model-store", request.getfixturevalue("moto_s3"), access_key="testing",
                              secret_key="testing", create_bucket=True)
    else:
        store = LocalObjectStore(tmp_path / "objects", "http://test", b"secret")
    original = source / "Stable-diffusion/demo-tiny.safetensors"
    store.put_file("models/sha256/abc", original, "application/octet-stream")
    seen: list[int] = []
    store.get_file("models/sha256/abc", tmp_path / "back", seen.append)
    assert (tmp_path / "back").read_bytes() == original.read_bytes()
    assert sum(seen) == original.stat().st_size
    with pytest.raises(ObjectNotFoundError):
        store.get_file("models/sha256/missing", tmp_path / "none")


def test_a_pull_verifies_retries_and_names_the_file(factory: sessionmaker[Session], source: Path,
                                                    tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects", "http://test", b"secret")
    with factory() as session:
        record, _ = add_file(session, store, source / LORA, "lora", "ink.safetensors", source="upload",
                             added_by="alice")
    folder = tmp_path / "worker-models"
    folder.mkdir()
    puller = ModelPuller(folder, store, RegistryView.of_database(folder, factory), 0, tries=2)
    spec = RenderSpec(model="demo-tiny", prompt="a lighthouse", steps=2, cfg_scale=7, sampler_name="Euler",
                      scheduler="Automatic", seed=1, width=64, height=64, denoising_strength=0.7,
                      loras=(LoraSpec(name="ink", file="ink.safetensors"),))
    (needed,) = puller.needed([spec])
    assert [r.relpath for r in needed] == ["Lora/ink.safetensors"]
    starts: list[int] = []
    assert puller.pull(puller.missing(needed), on_start=lambda: starts.append(1)) == 1
    assert (folder / "Lora/ink.safetensors").read_bytes() == (source / LORA).read_bytes()
    assert puller.missing(puller.needed([spec])[0]) == [] and starts == [1]

    stored = tmp_path / "objects" / object_key(record.sha256)
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")  # the store's copy rots
    (folder / "Lora/ink.safetensors").unlink()
    (folder / ".pulled" / "index.json").unlink()
    with pytest.raises(ModelPullError) as raised:
        puller.pull(puller.missing(puller.needed([spec])[0]))
    message = str(raised.value)
    assert "Lora/ink.safetensors" in message and "sha256" in message and "after 2 tries" in message
    assert not (folder / "Lora/ink.safetensors").exists()

    stored.unlink()  # the store lost it
    with pytest.raises(ModelPullError, match="Lora/ink.safetensors"):
        puller.pull(puller.missing(puller.needed([spec])[0]))


def test_one_process_at_a_time_registers_a_folder(factory: sessionmaker[Session], source: Path) -> None:
    with one_registration(factory, source) as first:
        assert first
        with one_registration(factory, source) as second, one_registration(factory, source.parent) as other:
            assert not second and other  # another folder is another lock
    with one_registration(factory, source) as again:
        assert again  # released
