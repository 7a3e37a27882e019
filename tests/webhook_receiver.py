"""A real HTTP webhook receiver for tests: verifies Standard Webhooks signatures, answers as scripted.

It verifies with the `standardwebhooks` library, the way a customer's receiver would, and
answers 400 to a request that does not verify, so a signing bug shows up as a failed delivery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float  # time.monotonic()


class Receiver:
    def __init__(self) -> None:
        self.secret: str | None = None
        self.requests: list[Received] = []
        self._scripts: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *replies: Reply) -> None:
        """Answer requests to `path` with `replies` in turn; the last one repeats."""
        with self._lock:
            self._scripts[path] = list(replies)

    def received(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _reply_for(self, path: str, verified: bool) -> Reply:
        if not verified:
            return Reply(400, body=b"signature did not verify")
        with self._lock:
            replies = self._scripts.get(path) or [Reply()]
            return replies.pop(0) if len(replies) > 1 else replies[0]

    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(receiver.secret or "whsec_MA==").verify(body, headers)
                    verified = receiver.secret is not None
                except WebhookVerificationError:
                    verified = False
                receiver._record(Received(self.path, headers, body, verified, time.monotonic()))
                reply = receiver._reply_for(self.path, verified)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler

    @contextmanager
    def running(self) -> Iterator[Receiver]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
