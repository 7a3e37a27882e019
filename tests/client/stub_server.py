"""A tiny scripted HTTP server for the client's own retry logic: it answers each request with the next reply
of its script (the last one repeats) and records what it was sent. Not a farm: only the status codes,
headers and bodies that the retry tests need."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

JOB = {"id": "00000000-0000-0000-0000-000000000001", "status": "queued", "progress": 0.0, "current_step": 0,
       "total_steps": 2, "eta_seconds": None, "queue_position": 1, "model": "demo-tiny", "seeds": [1],
       "images": [], "error": None, "params": {}}


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


class StubServer:
    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _next(self) -> Reply:
        with self._lock:
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with stub._lock:
                    stub.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                          time.monotonic()))
                reply = stub._next()
                body = json.dumps(reply.body).encode() if reply.body is not None else b""
                self.send_response(reply.status)
                for name, value in {"content-type": "application/json", **reply.headers}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815 (http.server's names)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler

    @contextmanager
    def running(self) -> Iterator[StubServer]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
