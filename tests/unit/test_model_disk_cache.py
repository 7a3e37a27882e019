"""The pulled-files cache: verified, atomic, shared between callers, LRU under a byte budget (issue 19)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from worker.model_pull.disk_cache import HashMismatchError, PulledFiles


def _blob(tag: str, size: int) -> tuple[bytes, str]:
    data = (tag.encode() * (size // len(tag) + 1))[:size]
    return data, hashlib.sha256(data).hexdigest()


def _writer(data: bytes, calls: list[str] | None = None):
    def download(part: Path) -> None:
        if calls is not None:
            calls.append(part.name)
        part.write_bytes(data)
    return download


def test_a_pull_installs_verified_bytes_once(tmp_path: Path) -> None:
    cache = PulledFiles(tmp_path, 0)
    data, sha = _blob("a", 1000)
    calls: list[str] = []
    assert cache.ensure("Lora/a.safetensors", sha, len(data), _writer(data, calls)) is True
    assert (tmp_path / "Lora/a.safetensors").read_bytes() == data
    assert cache.ensure("Lora/a.safetensors", sha, len(data), _writer(data, calls)) is False
    assert len(calls) == 1
    assert cache.pulled() == {"Lora/a.safetensors": sha}
    assert cache.has("Lora/a.safetensors", sha) and cache.used_bytes() == 1000
    assert not list((tmp_path / ".pulled/partial").iterdir())


def test_wrong_bytes_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    cache = PulledFiles(tmp_path, 0)
    _, sha = _blob("a", 1000)
    with pytest.raises(HashMismatchError) as raised:
        cache.ensure("Lora/a.safetensors", sha, 1000, _writer(b"corrupted" * 100))
    assert "Lora/a.safetensors" in str(raised.value) and "sha256" in str(raised.value)
    assert not (tmp_path / "Lora/a.safetensors").exists()
    assert not list((tmp_path / ".pulled/partial").iterdir())
    assert cache.pulled() == {}


def test_a_failing_download_leaves_no_partial_file_visible(tmp_path: Path) -> None:
    cache = PulledFiles(tmp_path, 0)
    _, sha = _blob("a", 1000)

    def broken(part: Path) -> None:
        part.write_bytes(b"half")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        cache.ensure("Lora/a.safetensors", sha, 1000, broken)
    assert not (tmp_path / "Lora/a.safetensors").exists()
    assert not list((tmp_path / ".pulled/partial").iterdir())


def test_concurrent_pulls_of_one_file_share_one_download(tmp_path: Path) -> None:
    data, sha = _blob("c", 50_000)
    calls: list[str] = []

    def slow(part: Path) -> None:
        calls.append(part.name)
        time.sleep(0.3)
        part.write_bytes(data)

    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(
        PulledFiles(tmp_path, 0).ensure("Lora/c.safetensors", sha, len(data), slow))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(results) == [False, False, False, True]


def test_the_budget_evicts_least_recently_used_but_never_pinned_or_operator_files(tmp_path: Path) -> None:
    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora/mine.safetensors").write_bytes(b"x" * 5000)  # the operator's own file
    cache = PulledFiles(tmp_path, 2500)
    blobs = {name: _blob(name, 1000) for name in ("a", "b", "c", "d")}
    for name in ("a", "b"):
        data, sha = blobs[name]
        cache.ensure(f"Lora/{name}.safetensors", sha, 1000, _writer(data))
        time.sleep(0.01)
    data, sha = blobs["a"]
    cache.ensure("Lora/a.safetensors", sha, 1000, _writer(data))  # a is now more recent than b
    data, sha = blobs["c"]
    cache.ensure("Lora/c.safetensors", sha, 1000, _writer(data))
    assert set(cache.pulled()) == {"Lora/a.safetensors", "Lora/c.safetensors"}  # b, least recent, went
    assert not (tmp_path / "Lora/b.safetensors").exists()
    data, sha = blobs["d"]
    cache.ensure("Lora/d.safetensors", sha, 1000, _writer(data), pinned=["Lora/a.safetensors"])
    assert set(cache.pulled()) == {"Lora/a.safetensors", "Lora/d.safetensors"}  # c went, a was pinned
    assert cache.used_bytes() <= 2500
    assert (tmp_path / "Lora/mine.safetensors").read_bytes() == b"x" * 5000


def test_an_operator_file_under_the_name_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora/a.safetensors").write_bytes(b"operator")
    data, sha = _blob("a", 100)
    calls: list[str] = []
    assert PulledFiles(tmp_path, 0).ensure("Lora/a.safetensors", sha, 100, _writer(data, calls)) is False
    assert calls == [] and (tmp_path / "Lora/a.safetensors").read_bytes() == b"operator"


def test_a_replaced_entry_is_pulled_again_over_the_old_pulled_copy(tmp_path: Path) -> None:
    cache = PulledFiles(tmp_path, 1500)
    old, old_sha = _blob("old", 1000)
    new, new_sha = _blob("new", 1000)
    cache.ensure("Lora/a.safetensors", old_sha, 1000, _writer(old))
    assert cache.ensure("Lora/a.safetensors", new_sha, 1000, _writer(new)) is True
    assert (tmp_path / "Lora/a.safetensors").read_bytes() == new
    assert cache.pulled() == {"Lora/a.safetensors": new_sha}


def test_a_file_bigger_than_the_budget_still_installs(tmp_path: Path) -> None:
    data, sha = _blob("big", 3000)
    assert PulledFiles(tmp_path, 1000).ensure("big.safetensors", sha, 3000, _writer(data)) is True
    assert (tmp_path / "big.safetensors").exists()


def test_a_use_without_a_download_counts_for_the_eviction_order(tmp_path: Path) -> None:
    cache = PulledFiles(tmp_path, 2500)
    blobs = {name: _blob(name, 1000) for name in ("a", "b", "c")}
    for name in ("a", "b"):
        data, sha = blobs[name]
        cache.ensure(f"{name}.safetensors", sha, 1000, _writer(data))
        time.sleep(0.01)
    cache.touch(["a.safetensors", "not-pulled.safetensors"])
    data, sha = blobs["c"]
    cache.ensure("c.safetensors", sha, 1000, _writer(data))
    assert set(cache.pulled()) == {"a.safetensors", "c.safetensors"}


def test_a_dead_process_s_partial_download_is_cleared_by_the_next_pull(tmp_path: Path) -> None:
    data, sha = _blob("a", 1000)
    stale = tmp_path / ".pulled" / "partial" / f"{sha}.99999.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    assert PulledFiles(tmp_path, 0).ensure("a.safetensors", sha, 1000, _writer(data)) is True
    assert not list(stale.parent.iterdir())
