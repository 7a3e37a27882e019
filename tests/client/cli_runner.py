"""Runs the installed `renderfarm` console script as a user's shell would: in a subprocess, with stderr on a
pseudo-terminal when the test needs to see what rich draws there."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from dataclasses import dataclass
from pathlib import Path

RENDERFARM = str(Path(sys.executable).parent / "renderfarm")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str  # what the terminal received, escape sequences included, when run with a pty


def cli_env(url: str | None = None, key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")}
    env.update(TERM="xterm-256color", PYTHONUNBUFFERED="1")
    env.pop("RENDERFARM_URL", None)
    env.pop("RENDERFARM_API_KEY", None)
    if url:
        env["RENDERFARM_URL"] = url
    if key:
        env["RENDERFARM_API_KEY"] = key
    return env


def run(*args: str, env: dict[str, str], timeout: float = 180) -> Result:
    done = subprocess.run([RENDERFARM, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


def run_in_pty(*args: str, env: dict[str, str], timeout: float = 180) -> Result:
    """stdout through a pipe (what a script reads), stdin and stderr on a 120x40 pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([RENDERFARM, *args], env=env, stdin=slave, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    received: list[bytes] = []

    def drain() -> None:  # keeps the terminal's buffer from filling up and blocking the child
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child's side is closed
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
        os.close(master)
    return Result(proc.returncode, stdout.decode(), b"".join(received).decode(errors="replace"))
