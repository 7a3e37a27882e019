"""The S3 store against a real S3 HTTP server: moto's standalone server in its own process.

What moto cannot test: it accepts tampered and expired presigned URLs, so signature
enforcement is not checked here (our own URL signing is tested in test_storage_local.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from shared.storage import (
    ObjectNotFoundError,
    ObjectStore,
    S3ObjectStore,
    StorageError,
    TransientStorageError,
    store_from_url,
)
from shared.storage.s3 import _translate

SECRET = b"unused-by-s3"
BASE = "http://farm.example:7861"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answers(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout}s")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("wb")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answers(f"{endpoint}/moto-api/", proc)
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def store(s3_endpoint: str) -> ObjectStore:
    url = f"s3://testing:testing@renderfarm-test?endpoint={s3_endpoint}&create_bucket=1"
    created = store_from_url(url, secret=SECRET, public_base_url=BASE)
    created.check()  # creates the bucket
    return created


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_factory_builds_s3_store(store: ObjectStore) -> None:
    assert isinstance(store, S3ObjectStore)
    assert isinstance(store, ObjectStore)
    assert store.bucket == "renderfarm-test"
    store.check()  # idempotent once the bucket exists


def test_put_get_exists_delete(store: ObjectStore) -> None:
    key = "jobs/abc/0.png"
    assert not store.exists(key)
    store.put(key, b"\x89PNG first", "image/png")
    assert store.exists(key)
    assert store.get(key) == b"\x89PNG first"

    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing key is not an error
    with pytest.raises(ObjectNotFoundError):
        store.get(key)


def test_overwrite(store: ObjectStore) -> None:
    key = "jobs/abc/1.png"
    store.put(key, b"a much longer first version", "image/png")
    store.put(key, b"second", "image/png")
    assert store.get(key) == b"second"


def test_presigned_url_downloads_bytes(store: ObjectStore, s3_endpoint: str) -> None:
    payload = bytes(range(256)) * 64
    store.put("jobs/abc/2.png", payload, "image/png")
    url = store.url("jobs/abc/2.png", expires_in=300)
    assert url.startswith(f"{s3_endpoint}/renderfarm-test/jobs/abc/2.png?")  # path-style
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert response.read() == payload


def test_public_endpoint_used_for_urls(s3_endpoint: str) -> None:
    port = s3_endpoint.rsplit(":", 1)[1]
    public = f"http://localhost:{port}"
    url = (
        f"s3://testing:testing@renderfarm-public?endpoint={s3_endpoint}"
        f"&public_endpoint={public}&create_bucket=1&region=eu-west-1"
    )
    store = store_from_url(url, secret=SECRET, public_base_url=BASE)
    store.put("a/b.png", b"through the public name", "image/png")  # creates the bucket on first put
    signed = store.url("a/b.png", expires_in=60)
    assert signed.startswith(f"{public}/renderfarm-public/a/b.png?")
    assert _download(signed) == b"through the public name"


def test_credentials_from_environment(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    store = store_from_url(
        f"s3://renderfarm-env?endpoint={s3_endpoint}&create_bucket=1", secret=SECRET, public_base_url=BASE
    )
    store.put("k", b"v", "application/octet-stream")
    assert store.get("k") == b"v"
    assert "X-Amz-Credential=from-env%2F" in store.url("k", expires_in=60)


def test_missing_bucket_without_create_fails_check(s3_endpoint: str) -> None:
    store = store_from_url(
        f"s3://testing:testing@no-such-bucket?endpoint={s3_endpoint}", secret=SECRET, public_base_url=BASE
    )
    with pytest.raises(StorageError) as info:
        store.check()
    assert not isinstance(info.value, TransientStorageError)
    assert "create_bucket=1" in str(info.value)


def test_unsafe_key_rejected_before_any_request(store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        store.put("../escape.png", b"x", "image/png")


def test_unreachable_endpoint_is_transient() -> None:
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    store = S3ObjectStore(
        "renderfarm-test", dead, access_key="testing", secret_key="testing", max_attempts=1, connect_timeout=2
    )
    for operation in (
        lambda: store.put("jobs/x/0.png", b"x", "image/png"),
        lambda: store.get("jobs/x/0.png"),
        lambda: store.exists("jobs/x/0.png"),
        store.check,
    ):
        with pytest.raises(TransientStorageError) as info:
            operation()
        assert info.value.__cause__ is not None  # chained from the botocore error

    via_factory = store_from_url(
        f"s3://testing:testing@renderfarm-test?endpoint={dead}", secret=SECRET, public_base_url=BASE
    )
    with pytest.raises(TransientStorageError):
        via_factory.get("jobs/x/0.png")


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (500, "InternalError", True),
        (503, "SlowDown", True),
        (429, "TooManyRequests", True),
        (400, "RequestTimeout", True),
        (403, "AccessDenied", False),
        (400, "InvalidArgument", False),
    ],
)
def test_client_errors_map_to_kinds(status: int, code: str, transient: bool) -> None:
    error = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )
    mapped = _translate(error, "put 'k'")
    assert isinstance(mapped, StorageError)
    assert isinstance(mapped, TransientStorageError) is transient


def test_botocore_errors_map_to_kinds() -> None:
    assert isinstance(
        _translate(EndpointConnectionError(endpoint_url="http://x"), "get"), TransientStorageError
    )
    no_creds = _translate(NoCredentialsError(), "get")
    assert isinstance(no_creds, StorageError) and not isinstance(no_creds, TransientStorageError)
