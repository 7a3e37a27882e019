"""Object store on any S3-compatible server (AWS, SeaweedFS, MinIO, moto).

Settings chosen so non-AWS servers work: path-style addressing (no per-bucket DNS names),
SigV4, and checksums only when an operation requires them (botocore >= 1.36 otherwise sends
CRC32 trailers some servers reject). Two clients share one session: the internal one talks
to ``endpoint_url`` (e.g. ``http://seaweedfs:8333`` inside the compose network) and the other
only signs URLs for ``public_endpoint_url`` (e.g. ``http://localhost:8333``), because a
presigned URL has the host baked into its signature and must name a host clients can reach.

Every botocore failure is translated at this boundary into ``TransientStorageError``
(connection trouble, timeouts, 5xx, throttling: retry) or ``StorageError`` (the rest), so
callers never import botocore.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from shared.storage.base import (
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
    validate_key,
)

# Error codes S3 servers use for "try again later" even when the status is not 5xx.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_BUCKET_MISSING_CODES = frozenset({"NoSuchBucket", "NotFound", "404"})


class S3ObjectStore:
    """Objects in one bucket; ``url()`` hands out presigned GETs."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        public_endpoint_url: str | None = None,
        create_bucket: bool = False,
        *,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not bucket:
            raise ValueError("S3ObjectStore needs a bucket name")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url or endpoint_url
        self.region = region
        self.create_bucket = create_bucket
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # No network traffic happens here: boto3 clients connect lazily.
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._presign_client = session.client("s3", endpoint_url=self.public_endpoint_url, config=config)
        self._bucket_ready = not create_bucket
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    def put(self, key: str, data: bytes, content_type: str) -> None:
        validate_key(key)
        self._ensure_bucket()
        with self._translate_errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        validate_key(key)
        with self._translate_errors("get", key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            # Reading the body is network I/O too; keep it inside the translation.
            return response["Body"].read()

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        validate_key(key)
        self._ensure_bucket()
        with self._translate_errors("put", key):  # boto3's managed transfer: multipart above its threshold
            try:
                self._client.upload_file(str(path), self.bucket, key, ExtraArgs={"ContentType": content_type})
            except S3UploadFailedError as e:  # boto3 wraps the ClientError of a managed upload
                if isinstance(e.__cause__, ClientError | BotoCoreError):
                    raise e.__cause__ from e
                raise StorageError(f"S3 could not put {key!r} in bucket {self.bucket!r}: {e}") from e

    def get_file(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        validate_key(key)
        with self._translate_errors("get", key):
            self._client.download_file(self.bucket, key, str(path), Callback=on_bytes)

    def exists(self, key: str) -> bool:
        validate_key(key)
        try:
            with self._translate_errors("head", key):
                self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._translate_errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def url(self, key: str, expires_in: int) -> str:
        validate_key(key)
        if expires_in <= 0:
            raise ValueError(f"expires_in must be a positive number of seconds, got {expires_in}")
        with self._translate_errors("presign", key):
            return self._presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_in)
            )

    def check(self) -> None:
        """Raise unless the bucket answers (creating it first when ``create_bucket`` is set)."""
        if self._bucket_exists():
            self._bucket_ready = True
            return
        if not self.create_bucket:
            raise StorageError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}"
                " (create it, or add create_bucket=1 to STORAGE_URL)"
            )
        self._ensure_bucket()

    def _bucket_exists(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _error_code(e) in _BUCKET_MISSING_CODES:
                return False
            raise _translate(e, f"check bucket {self.bucket!r}") from e
        except BotoCoreError as e:
            raise _translate(e, f"check bucket {self.bucket!r}") from e
        return True

    def _ensure_bucket(self) -> None:
        """Create the bucket once per process when asked to; API and workers may race here."""
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self._bucket_exists():
                self._create_bucket()
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        kwargs: dict = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            if _error_code(e) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another process won the race
            raise _translate(e, f"create bucket {self.bucket!r}") from e
        except BotoCoreError as e:
            raise _translate(e, f"create bucket {self.bucket!r}") from e

    @contextmanager
    def _translate_errors(self, operation: str, key: str) -> Iterator[None]:
        try:
            yield
        except ClientError as e:
            if operation in ("get", "head") and _error_code(e) in _NOT_FOUND_CODES:
                raise ObjectNotFoundError(f"no object under key {key!r} in bucket {self.bucket!r}") from e
            raise _translate(e, f"{operation} {key!r} in bucket {self.bucket!r}") from e
        except BotoCoreError as e:
            raise _translate(e, f"{operation} {key!r} in bucket {self.bucket!r}") from e


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _translate(error: BotoCoreError | ClientError, what: str) -> StorageError:
    """Pick the error kind; the caller chains it with ``raise ... from error``."""
    if isinstance(error, ClientError):
        status, code = _status(error), _error_code(error)
        message = f"S3 could not {what}: {code or status} {error}"
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            return TransientStorageError(message)
        return StorageError(message)
    if isinstance(error, SSLError):
        return StorageError(f"S3 could not {what}: TLS failure: {error}")
    if isinstance(error, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return TransientStorageError(f"S3 could not {what}: {error}")
    return StorageError(f"S3 could not {what}: {error}")
