"""The local-directory store: the embedded default, and the store whose signed URLs we own.

moto's S3 server does not enforce presigned-URL signatures, so URL signing is tested here,
on our own HMAC, directly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.storage import (
    LocalObjectStore,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    store_from_url,
    validate_key,
)

SECRET = b"test-secret-not-for-production"
BASE = "http://farm.example:7861"


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects", public_base_url=BASE + "/", secret=SECRET)


def _signed_parts(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return parts.path, int(query["expires"][0]), query["signature"][0]


def test_satisfies_protocol(store: LocalObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_put_get_exists_delete(store: LocalObjectStore) -> None:
    key = "jobs/abc/0.png"
    assert not store.exists(key)
    store.put(key, b"\x89PNG first", "image/png")
    assert store.exists(key)
    assert store.get(key) == b"\x89PNG first"
    assert store.path_for(key) == store.root / "jobs" / "abc" / "0.png"

    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing key is not an error
    with pytest.raises(ObjectNotFoundError):
        store.get(key)


def test_overwrite_replaces_whole_object_and_leaves_no_temp_files(store: LocalObjectStore) -> None:
    key = "jobs/abc/0.png"
    store.put(key, b"a much longer first version of the image", "image/png")
    store.put(key, b"short", "image/png")
    assert store.get(key) == b"short"
    assert [p.name for p in store.path_for(key).parent.iterdir()] == ["0.png"]


def test_failed_write_keeps_old_object(store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "jobs/abc/0.png"
    store.put(key, b"old", "image/png")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError):
        store.put(key, b"new", "image/png")
    monkeypatch.undo()
    assert store.get(key) == b"old"
    assert [p.name for p in store.path_for(key).parent.iterdir()] == ["0.png"]


def test_prefix_is_not_an_object(store: LocalObjectStore) -> None:
    store.put("jobs/abc/0.png", b"x", "image/png")
    assert not store.exists("jobs/abc")
    with pytest.raises(ObjectNotFoundError):
        store.get("jobs/abc")
    store.delete("jobs/abc")
    assert store.exists("jobs/abc/0.png")


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "a\\b", "a\nb", "a\x00b", "x" * 1025],
)
def test_rejects_unsafe_keys(store: LocalObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        validate_key(key)
    with pytest.raises(ValueError):
        store.put(key, b"x", "image/png")
    with pytest.raises(ValueError):
        store.path_for(key)


@pytest.mark.parametrize("key", ["a", "jobs/0b7c/0.png", "x/y z/ünïcode..png", "..hidden/ok"])
def test_accepts_ordinary_keys(key: str) -> None:
    assert validate_key(key) == key


def test_symlink_out_of_root_is_rejected(store: LocalObjectStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store.root.mkdir(parents=True)
    (store.root / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        store.path_for("link/secret.png")


def test_url_format(store: LocalObjectStore) -> None:
    before = int(time.time())
    url = store.url("jobs/abc/0 1.png", expires_in=300)
    assert url.startswith(f"{BASE}/v1/files/jobs/abc/0%201.png?expires=")
    path, expires, signature = _signed_parts(url)
    assert path == "/v1/files/jobs/abc/0%201.png"
    assert before + 300 <= expires <= int(time.time()) + 300
    assert len(signature) == 64 and int(signature, 16) >= 0
    with pytest.raises(ValueError):
        store.url("jobs/abc/0.png", expires_in=0)


def test_signature_accepted(store: LocalObjectStore) -> None:
    _, expires, signature = _signed_parts(store.url("jobs/abc/0.png", expires_in=60))
    assert store.verify_signature("jobs/abc/0.png", expires, signature)


def test_signature_rejects_tampering(store: LocalObjectStore) -> None:
    _, expires, signature = _signed_parts(store.url("jobs/abc/0.png", expires_in=60))
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert not store.verify_signature("jobs/abc/0.png", expires, flipped)
    assert not store.verify_signature("jobs/abc/0.png", expires + 3600, signature)
    assert not store.verify_signature("jobs/abc/0.png", expires, "")
    assert not store.verify_signature("jobs/abc/0.png", expires, "ü" * 64)


def test_signature_bound_to_key(store: LocalObjectStore) -> None:
    _, expires, signature = _signed_parts(store.url("jobs/abc/0.png", expires_in=60))
    assert not store.verify_signature("jobs/abc/1.png", expires, signature)
    assert not store.verify_signature("../jobs/abc/0.png", expires, signature)


def test_signature_expires(store: LocalObjectStore) -> None:
    _, expires, signature = _signed_parts(store.url("jobs/abc/0.png", expires_in=60))
    assert store.verify_signature("jobs/abc/0.png", expires, signature, now=expires - 1)
    assert not store.verify_signature("jobs/abc/0.png", expires, signature, now=expires + 1)


def test_signature_bound_to_secret(store: LocalObjectStore) -> None:
    other = LocalObjectStore(store.root, public_base_url=BASE, secret=b"another secret")
    _, expires, signature = _signed_parts(store.url("jobs/abc/0.png", expires_in=60))
    assert not other.verify_signature("jobs/abc/0.png", expires, signature)


def test_check_creates_root(store: LocalObjectStore) -> None:
    assert not store.root.exists()
    store.check()
    assert store.root.is_dir()


def test_check_fails_when_root_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError):
        LocalObjectStore(blocker / "objects", public_base_url=BASE, secret=SECRET).check()


def test_empty_secret_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalObjectStore(tmp_path, public_base_url=BASE, secret=b"")


def test_factory_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_file_url = store_from_url(f"file://{tmp_path}/a", secret=SECRET, public_base_url=BASE)
    assert isinstance(by_file_url, LocalObjectStore) and by_file_url.root == (tmp_path / "a").resolve()

    by_path = store_from_url(str(tmp_path / "b"), secret=SECRET, public_base_url=BASE)
    assert isinstance(by_path, LocalObjectStore) and by_path.root == (tmp_path / "b").resolve()

    monkeypatch.chdir(tmp_path)
    relative = store_from_url("var/storage", secret=SECRET, public_base_url=BASE)
    assert isinstance(relative, LocalObjectStore) and relative.root == (tmp_path / "var/storage").resolve()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://host/x",
        "gs://bucket",
        "file://otherhost/x",
        "s3://",
        "s3://bucket/prefix",
        "s3://bucket?endpont=http://x",
        "s3://bucket?create_bucket=maybe",
        "s3://KEYONLY@bucket",
    ],
)
def test_factory_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        store_from_url(url, secret=SECRET, public_base_url=BASE)


def test_factory_error_names_allowed_forms() -> None:
    with pytest.raises(ValueError, match=r"file:///.*s3://"):
        store_from_url("gs://bucket", secret=SECRET, public_base_url=BASE)
