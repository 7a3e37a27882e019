"""Model hashes: each digest recomputed here with hashlib, independently of shared.webui.hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.webui import hashes
from shared.webui.hashes import (
    HashCache,
    addnet_hash,
    checkpoint_short_hash,
    legacy_model_hash,
    lora_short_hash,
    sha256_file,
)

MIB = 1024 * 1024


def _bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic non-repeating bytes, so a hash over the wrong range cannot match by chance."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _safetensors(path: Path, tensor_data: bytes, metadata: dict[str, str] | None = None) -> Path:
    header: dict[str, object] = {
        "w": {"dtype": "U8", "shape": [len(tensor_data)], "data_offsets": [0, len(tensor_data)]}
    }
    if metadata is not None:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    return _write(path, struct.pack("<Q", len(encoded)) + encoded + tensor_data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# The digests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, MIB + 1, 2 * MIB + 12345])
def test_sha256_file_is_the_sha256_of_the_whole_file(tmp_path: Path, size: int) -> None:
    data = _bytes(size)
    path = _write(tmp_path / "model.safetensors", data)
    assert sha256_file(path) == _sha(data)
    assert sha256_file(str(path)) == _sha(data)


def test_sha256_file_reads_in_one_mib_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "model.ckpt", _bytes(2 * MIB + 5))
    sizes: list[int] = []
    real_open = open

    class Recording:
        def __init__(self, file) -> None:
            self.file = file

        def read(self, size: int = -1) -> bytes:
            sizes.append(size)
            return self.file.read(size)

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(hashes, "open", lambda *a, **k: Recording(real_open(*a, **k)), raising=False)
    sha256_file(path)
    assert set(sizes) == {MIB}


def test_checkpoint_short_hash_is_ten_hex_digits_of_the_sha256(tmp_path: Path) -> None:
    data = _bytes(3000)
    path = _write(tmp_path / "anything.safetensors", data)
    assert checkpoint_short_hash(path) == _sha(data)[:10]
    assert len(checkpoint_short_hash(path)) == 10


def test_legacy_model_hash_hashes_64_kib_at_one_mib(tmp_path: Path) -> None:
    data = _bytes(MIB + 0x10000 + 777)
    path = _write(tmp_path / "old.ckpt", data)
    assert legacy_model_hash(path) == _sha(data[0x100000:0x110000])[:8]


def test_legacy_model_hash_of_a_short_file_hashes_what_is_there(tmp_path: Path) -> None:
    assert legacy_model_hash(_write(tmp_path / "tiny.ckpt", b"tiny")) == _sha(b"")[:8] == "e3b0c442"
    partial = _bytes(MIB + 100)
    assert legacy_model_hash(_write(tmp_path / "partial.ckpt", partial)) == _sha(partial[MIB:])[:8]


def test_legacy_model_hash_of_a_missing_file_is_nofile(tmp_path: Path) -> None:
    assert legacy_model_hash(tmp_path / "missing.ckpt") == "NOFILE"


def test_addnet_hash_skips_the_safetensors_header(tmp_path: Path) -> None:
    tensors = _bytes(5000, seed=1)
    path = _safetensors(tmp_path / "lora.safetensors", tensors, {"ss_output_name": "detail"})
    assert addnet_hash(path) == _sha(tensors)
    assert lora_short_hash(path) == _sha(tensors)[:12]


def test_lora_hash_does_not_change_when_only_metadata_changes(tmp_path: Path) -> None:
    tensors = _bytes(4096, seed=2)
    first = _safetensors(tmp_path / "a.safetensors", tensors, {"ss_output_name": "one"})
    second = _safetensors(tmp_path / "b.safetensors", tensors, {"ss_output_name": "a much longer name"})
    assert sha256_file(first) != sha256_file(second)
    assert lora_short_hash(first) == lora_short_hash(second) == _sha(tensors)[:12]


def test_lora_hash_prefers_the_hash_recorded_by_the_trainer(tmp_path: Path) -> None:
    recorded = "0123456789abcdef" * 4
    path = _safetensors(tmp_path / "kohya.safetensors", _bytes(100), {"sshs_model_hash": recorded})
    assert lora_short_hash(path) == "0123456789ab"


def test_lora_hash_of_a_pickled_lora_is_the_whole_file_sha256(tmp_path: Path) -> None:
    data = _bytes(3333, seed=3)
    assert lora_short_hash(_write(tmp_path / "old_lora.pt", data)) == _sha(data)[:12]


def test_lora_suffix_is_case_insensitive(tmp_path: Path) -> None:
    tensors = _bytes(64)
    assert lora_short_hash(_safetensors(tmp_path / "UPPER.SAFETENSORS", tensors)) == _sha(tensors)[:12]


@pytest.mark.parametrize(
    "header", [b"not json at all", b'{"unterminated', b"[1, 2, 3]", b'{"__metadata__": 5}']
)
def test_an_unreadable_header_falls_back_to_the_addnet_hash(tmp_path: Path, header: bytes) -> None:
    tensors = _bytes(256)
    path = _write(tmp_path / "odd.safetensors", struct.pack("<Q", len(header)) + header + tensors)
    assert lora_short_hash(path) == _sha(tensors)[:12]


def test_a_file_too_short_for_a_header_hashes_like_the_webui(tmp_path: Path) -> None:
    path = _write(tmp_path / "stub.safetensors", b"\x01\x02")
    assert lora_short_hash(path) == _sha(b"")[:12]


# --------------------------------------------------------------------------------------------------
# HashCache
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts full hash computations by wrapping the module's functions."""
    counts = {"sha256": 0, "lora": 0}

    def wrap(name: str, key: str) -> None:
        original: Callable[[Path], str] = getattr(hashes, name)

        def counting(path: Path) -> str:
            counts[key] += 1
            return original(path)

        monkeypatch.setattr(hashes, name, counting)

    wrap("sha256_file", "sha256")
    wrap("lora_short_hash", "lora")
    return counts


def _bump_mtime(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_each_file_is_hashed_once(tmp_path: Path, counted: dict[str, int]) -> None:
    data = _bytes(10_000)
    path = _write(tmp_path / "model.safetensors", data)
    cache = HashCache()
    assert cache.sha256(path) == _sha(data)
    assert cache.checkpoint(path) == _sha(data)[:10]
    assert cache.sha256(str(path)) == _sha(data)
    assert counted["sha256"] == 1


def test_a_cache_hit_opens_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "model.safetensors", _bytes(1000))
    cache = HashCache()
    cache.checkpoint(path)
    opened: list[object] = []
    real_open = open
    monkeypatch.setattr(
        hashes, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k), raising=False
    )
    cache.checkpoint(path)
    cache.sha256(path)
    assert opened == []


def test_lora_and_sha256_are_cached_separately(tmp_path: Path, counted: dict[str, int]) -> None:
    tensors = _bytes(500)
    path = _safetensors(tmp_path / "lora.safetensors", tensors)
    cache = HashCache()
    for _ in range(3):
        assert cache.lora(path) == _sha(tensors)[:12]
        assert cache.sha256(path) == _sha(path.read_bytes())
    assert counted == {"sha256": 1, "lora": 1}


def test_a_new_mtime_invalidates(tmp_path: Path, counted: dict[str, int]) -> None:
    path = _write(tmp_path / "model.ckpt", b"A" * 100)
    cache = HashCache()
    cache.sha256(path)
    path.write_bytes(b"B" * 100)  # same size
    _bump_mtime(path)
    assert cache.sha256(path) == _sha(b"B" * 100)
    assert counted["sha256"] == 2


def test_a_new_size_invalidates(tmp_path: Path, counted: dict[str, int]) -> None:
    path = _write(tmp_path / "model.ckpt", b"A" * 100)
    cache = HashCache()
    cache.sha256(path)
    stat = path.stat()
    path.write_bytes(b"A" * 101)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, different size
    assert cache.sha256(path) == _sha(b"A" * 101)
    assert counted["sha256"] == 2


def test_the_same_file_through_a_symlink_is_one_entry(tmp_path: Path, counted: dict[str, int]) -> None:
    path = _write(tmp_path / "model.safetensors", _bytes(100))
    link = tmp_path / "alias.safetensors"
    link.symlink_to(path)
    cache = HashCache()
    assert cache.sha256(link) == cache.sha256(path)
    assert counted["sha256"] == 1


def test_the_cache_file_survives_a_restart(tmp_path: Path, counted: dict[str, int]) -> None:
    cache_file = tmp_path / "cache" / "hashes.json"
    model = _write(tmp_path / "model.safetensors", _bytes(2000))
    lora = _safetensors(tmp_path / "lora.safetensors", _bytes(300))
    first = HashCache(cache_file)
    expected = (first.checkpoint(model), first.lora(lora))
    assert counted == {"sha256": 1, "lora": 1}

    second = HashCache(cache_file)
    assert (second.checkpoint(model), second.lora(lora)) == expected
    assert counted == {"sha256": 1, "lora": 1}
    stored = json.loads(cache_file.read_text())
    assert stored["format"] == 1 and len(stored["entries"]) == 2


def test_a_persisted_entry_is_invalidated_after_a_restart(tmp_path: Path, counted: dict[str, int]) -> None:
    cache_file = tmp_path / "hashes.json"
    model = _write(tmp_path / "model.safetensors", b"old")
    HashCache(cache_file).sha256(model)
    model.write_bytes(b"new!")
    assert HashCache(cache_file).sha256(model) == _sha(b"new!")
    assert counted["sha256"] == 2


def test_caches_sharing_a_file_keep_each_others_entries(tmp_path: Path, counted: dict[str, int]) -> None:
    cache_file = tmp_path / "hashes.json"
    one, two = _write(tmp_path / "one.ckpt", b"1"), _write(tmp_path / "two.ckpt", b"2")
    api, worker = HashCache(cache_file), HashCache(cache_file)
    api.sha256(one)
    worker.sha256(two)
    fresh = HashCache(cache_file)
    fresh.sha256(one)
    fresh.sha256(two)
    assert counted["sha256"] == 2


def test_the_cache_file_is_parsed_again_only_when_it_was_replaced(tmp_path: Path, counted: dict[str, int],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A submit opens the models folder's cache for every request: the file is parsed once per version (each
    write replaces it), and a cache opened after another process's write sees that write."""
    parses = []
    parse = HashCache._parse_file
    monkeypatch.setattr(HashCache, "_parse_file", lambda self: parses.append(1) or parse(self))
    cache_file = tmp_path / "hashes.json"
    one, two = _write(tmp_path / "one.ckpt", b"1"), _write(tmp_path / "two.ckpt", b"2")
    HashCache(cache_file).sha256(one)  # no file yet, then written: parsed to merge before the write
    before = len(parses)
    for _ in range(5):
        assert HashCache(cache_file).sha256(one) == _sha(b"1")
    assert len(parses) == before + 1 and counted["sha256"] == 1  # the written version, once
    other = HashCache(cache_file)
    other._entries.clear()  # another process's view, which knows only its own digest
    other.sha256(two)  # replaces the file
    assert HashCache(cache_file).sha256(two) == _sha(b"2") and counted["sha256"] == 2  # its entry is seen
    assert HashCache(cache_file).sha256(one) == _sha(b"1") and counted["sha256"] == 2


@pytest.mark.parametrize(
    "content", ["{not json", '{"format": 99, "entries": {}}', "[]", '{"format": 1, "entries": 3}']
)
def test_an_unusable_cache_file_is_ignored_and_replaced(
    tmp_path: Path, content: str, counted: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    cache_file = _write(tmp_path / "hashes.json", content.encode())
    model = _write(tmp_path / "model.ckpt", b"data")
    with caplog.at_level(logging.WARNING, logger="shared.webui.hashes"):
        assert HashCache(cache_file).sha256(model) == _sha(b"data")
    assert "hash cache" in caplog.text
    assert json.loads(cache_file.read_text())["format"] == 1
    HashCache(cache_file).sha256(model)
    assert counted["sha256"] == 1


def test_an_unwritable_cache_file_keeps_the_cache_in_memory(
    tmp_path: Path, counted: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    blocker = _write(tmp_path / "not_a_directory", b"")
    model = _write(tmp_path / "model.ckpt", b"data")
    cache = HashCache(blocker / "hashes.json")
    with caplog.at_level(logging.WARNING, logger="shared.webui.hashes"):
        assert cache.sha256(model) == _sha(b"data")
        assert cache.sha256(model) == _sha(b"data")
    assert "keeping it in memory" in caplog.text
    assert counted["sha256"] == 1


def test_a_file_that_changes_while_being_hashed_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "copying.safetensors", b"partial")
    calls = []
    original = hashes.sha256_file

    def racing(p: Path) -> str:
        calls.append(p)
        digest = original(p)
        if len(calls) == 1:
            path.write_bytes(b"partial plus the rest")
        return digest

    monkeypatch.setattr(hashes, "sha256_file", racing)
    cache = HashCache()
    cache.sha256(path)
    assert cache.sha256(path) == _sha(b"partial plus the rest")
    assert len(calls) == 2


def test_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        HashCache().checkpoint(tmp_path / "missing.safetensors")


def test_concurrent_lookups_agree(tmp_path: Path) -> None:
    paths = [_write(tmp_path / f"m{i}.ckpt", _bytes(5000, seed=i)) for i in range(8)]
    cache = HashCache(tmp_path / "hashes.json")
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(cache.checkpoint, paths * 4))
    assert results == [_sha(p.read_bytes())[:10] for p in paths] * 4
    assert len(json.loads((tmp_path / "hashes.json").read_text())["entries"]) == 8
