"""Object store on a local directory, for the embedded default and for tests.

It behaves like the S3 store where callers can tell: writes are atomic (a temp file in the
same directory, then ``os.replace``), so a reader or a re-run never sees half a PNG, and
``url()`` returns an expiring link that needs no other credentials. The link points at the
API (``/v1/files/{key}``); the route that serves it checks ``verify_signature`` and reads
``path_for(key)``. The HMAC covers the key and the expiry, so a link cannot be stretched in
time or moved to another object.

Content types are not stored: the serving route derives them from the key's extension.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlencode

from shared.storage.base import ObjectNotFoundError, StorageError, validate_key

# Temp files start with this; it marks leftovers of a crash between write and rename.
_TEMP_PREFIX = ".tmp-"


_COPY_CHUNK = 1 << 20


class LocalObjectStore:
    """Files under ``root``, served through HMAC-signed URLs below ``public_base_url``."""

    def __init__(self, root: Path, public_base_url: str, secret: bytes) -> None:
        if not secret:
            raise ValueError("LocalObjectStore needs a non-empty secret to sign URLs")
        self.root = Path(root).expanduser().resolve()
        self.public_base_url = public_base_url.rstrip("/")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return f"LocalObjectStore(root={str(self.root)!r}, public_base_url={self.public_base_url!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``; raises ValueError for keys that would leave ``root``."""
        validate_key(key)
        path = (self.root / key).resolve()
        # validate_key already forbids '..'; this also catches a symlink inside root that
        # points outside it.
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} resolves outside the storage root")
        return path

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        """Write the object through a temporary file beside it, synced, then renamed into place (atomic)."""
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as tmp:
                    fill(tmp)
                    tmp.flush()
                    os.fsync(tmp.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StorageError(f"could not write {key!r} under {self.root}: {e}") from e

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._write(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, out, _COPY_CHUNK)

        self._write(key, copy)

    def get_file(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        source = self.path_for(key)
        try:
            with open(source, "rb") as src, open(path, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            if not source.is_file():
                raise ObjectNotFoundError(f"no object under key {key!r}") from e
            raise StorageError(f"could not read {key!r} under {self.root}: {e}") from e
        except OSError as e:
            raise StorageError(f"could not read {key!r} under {self.root}: {e}") from e

    def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFoundError(f"no object under key {key!r}") from e
        except OSError as e:
            raise StorageError(f"could not read {key!r} under {self.root}: {e}") from e

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return  # a key prefix, not an object: nothing to delete, as on S3
        except OSError as e:
            raise StorageError(f"could not delete {key!r} under {self.root}: {e}") from e

    def url(self, key: str, expires_in: int) -> str:
        validate_key(key)
        if expires_in <= 0:
            raise ValueError(f"expires_in must be a positive number of seconds, got {expires_in}")
        expires = int(time.time()) + int(expires_in)
        query = urlencode({"expires": expires, "signature": self._sign(key, expires)})
        return f"{self.public_base_url}/v1/files/{quote(key, safe='/')}?{query}"

    def verify_signature(self, key: str, expires: int, signature: str, now: float | None = None) -> bool:
        """True if ``signature`` was made by ``url()`` for this key and has not expired."""
        try:
            validate_key(key)
        except ValueError:
            return False
        current = time.time() if now is None else now
        if expires < current:
            return False
        expected = self._sign(key, expires).encode("ascii")
        return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"storage root {self.root} cannot be created: {e}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage root {self.root} is not writable")

    def _sign(self, key: str, expires: int) -> str:
        # A newline cannot occur in a valid key, so "key\nexpires" parses one way only.
        message = f"{key}\n{int(expires)}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()
