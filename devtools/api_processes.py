"""The API as several uvicorn processes on one port, each with a listening socket of its own (SO_REUSEPORT).

With uvicorn's own ``--workers``, the processes share one listening socket and the first to wake accepts every
connection waiting (asyncio accepts in a loop): a client that keeps its connections open, as HTTP clients and
load generators do, lands all of them on one process, and the others sit idle (measured with 16 keep-alive
connections: one process served all of them, issue 20). With a socket per process bound with SO_REUSEPORT, the
kernel spreads new connections across the processes by their addresses.
"""

from __future__ import annotations

import argparse
import socket
import sys

BACKLOG = 2048  # uvicorn's default


def reuse_port_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets bound to the same address; each process gets one (inheritable)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def serve_command(sock: socket.socket, log_level: str = "info") -> list[str]:
    """The command that serves the API on ``sock`` (pass its descriptor to the child: ``pass_fds``). Not uvicorn's
    own ``--fd``: it takes the descriptor for a Unix socket, and asyncio then leaves Nagle's algorithm on for each
    connection (every response with a body waited 40 ms for a delayed ACK)."""
    return [sys.executable, "-m", "devtools.api_processes", "--fd", str(sock.fileno()), "--log-level", log_level]


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="serve the API on an inherited listening socket")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)  # its family and type read from the descriptor itself
    uvicorn.Server(uvicorn.Config("api.main:app", log_level=args.log_level, backlog=BACKLOG)).run(sockets=[sock])


if __name__ == "__main__":
    main()
