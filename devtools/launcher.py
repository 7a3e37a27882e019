"""`make up`: the whole farm in the foreground on embedded defaults.

Starts a real PostgreSQL and redis-server under ./var (unless DATABASE_URL / REDIS_URL
point elsewhere), applies migrations, makes sure there is an admin key and a checkpoint,
then runs the API and one worker. Ctrl-C stops every process it started, in order.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from devtools.api_processes import reuse_port_sockets, serve_command
from devtools.demo_models import DEMO_BUILDERS
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, port_open

PG_PORT = int(os.environ.get("RENDERFARM_EMBEDDED_PG_PORT", "55432"))
REDIS_PORT = int(os.environ.get("RENDERFARM_EMBEDDED_REDIS_PORT", "56379"))


def _say(message: str) -> None:
    print(f"[renderfarm] {message}", flush=True)


def _read_or_create(path: Path, make: callable) -> str:
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


class Farm:
    def __init__(self, var_dir: Path) -> None:
        self.var_dir = var_dir.resolve()
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ)

    def prepare(self) -> None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        env = self.env
        if not env.get("DATABASE_URL"):
            if port_open(PG_PORT):
                raise SystemExit(f"port {PG_PORT} is taken: is another `make up` running? "
                                 "Set RENDERFARM_EMBEDDED_PG_PORT or DATABASE_URL.")
            self.postgres = EmbeddedPostgres(self.var_dir / "postgres", PG_PORT).start()
            env["DATABASE_URL"] = self.postgres.url
            _say(f"PostgreSQL (embedded) on 127.0.0.1:{PG_PORT}, data in {self.postgres.data_dir}")
        if not env.get("REDIS_URL"):
            if port_open(REDIS_PORT):
                raise SystemExit(f"port {REDIS_PORT} is taken: is another `make up` running? "
                                 "Set RENDERFARM_EMBEDDED_REDIS_PORT or REDIS_URL.")
            self.redis = EmbeddedRedis(self.var_dir / "redis", REDIS_PORT, persist=True).start()
            env["REDIS_URL"] = self.redis.url
            _say(f"Redis (embedded) on 127.0.0.1:{REDIS_PORT}, data in {self.redis.data_dir}")
        env.setdefault("STORAGE_URL", str(self.var_dir / "objects"))
        if not env.get("RENDERFARM_SECRET_KEY"):
            env["RENDERFARM_SECRET_KEY"] = _read_or_create(self.var_dir / "secret_key", lambda: secrets.token_hex(32))
        if not env.get("RENDERFARM_ADMIN_KEY"):
            from shared.auth import generate_key

            env["RENDERFARM_ADMIN_KEY"] = _read_or_create(self.var_dir / "admin_key", generate_key)
        env.setdefault("RENDERFARM_MODELS_DIR", "models")
        env.setdefault("RENDERFARM_PUBLIC_URL", "http://127.0.0.1:7861")

        from shared.db.migrate import upgrade

        upgrade(env["DATABASE_URL"])
        _say("database migrated")
        self._ensure_admin_key()
        for builder in DEMO_BUILDERS:
            subprocess.run([sys.executable, "-m", builder, env["RENDERFARM_MODELS_DIR"]], env=env, check=True)

    def _ensure_admin_key(self) -> None:
        from sqlalchemy.orm import Session

        from shared.auth import create_api_key
        from shared.db.session import make_engine

        engine = make_engine(self.env["DATABASE_URL"], pool_size=1, max_overflow=0)  # one session, then gone
        with Session(engine) as session:
            create_api_key(session, "admin", is_admin=True, name="admin", key=self.env["RENDERFARM_ADMIN_KEY"])
            session.commit()
        engine.dispose()

    def spawn(self, name: str, args: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        proc = subprocess.Popen(args, env=self.env, start_new_session=True, pass_fds=pass_fds)
        self.children.append((name, proc))

    def run(self) -> int:
        from shared.settings import GatewaySettings

        api_port = os.environ.get("RENDERFARM_API_PORT", "7861")
        # RENDERFARM_API_WORKERS processes (default: one per core) share the port, each with a socket of its own so
        # the kernel spreads connections across them (devtools/api_processes.py); the API keeps no state of its own.
        api_workers = GatewaySettings().api_worker_count()
        for index, sock in enumerate(reuse_port_sockets("127.0.0.1", int(api_port), api_workers)):
            self.spawn(f"api {index + 1}", serve_command(sock), pass_fds=(sock.fileno(),))
            sock.close()  # the process has its own copy
        # One worker for everything on a development farm: renders and trainings (a training holds it while it runs).
        self.spawn("worker", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "render,train",
                              "-c", "1", "--prefetch-multiplier=1", "-E", "-n", "worker1@%h",
                              "--without-gossip", "--without-mingle", "--loglevel=INFO"])
        self.spawn("webhooks", [sys.executable, "-m", "celery", "-A", "worker.webhook_sender.app", "worker",
                                "-Q", "webhooks", "-c", "2", "-n", "webhooks@%h", "--loglevel=INFO"])
        key = self.env["RENDERFARM_ADMIN_KEY"]
        _say(f"API on http://127.0.0.1:{api_port} ({api_workers} processes; OpenAPI at /docs); "
             "Ctrl-C stops everything")
        _say(f"admin API key: {key}")
        _say(f"try: curl -s -X POST http://127.0.0.1:{api_port}/v1/jobs -H 'Authorization: Bearer {key}' "
             "-H 'Content-Type: application/json' -d '{\"prompt\": \"a lighthouse\", \"width\": 64, \"height\": 64}'")
        stopping = False

        def request_stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        code = 0
        while not stopping:
            for name, proc in self.children:
                if proc.poll() is not None:
                    _say(f"{name} exited with {proc.returncode}; stopping the farm")
                    stopping, code = True, 1
            time.sleep(0.3)
        return code

    def shutdown(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                _say(f"stopping {name}")
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.children):
            try:
                proc.wait(timeout=60 if name == "worker" else 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            _say("stopping Redis")
            self.redis.stop()
        if self.postgres is not None:
            _say("stopping PostgreSQL")
            self.postgres.stop()
        _say("stopped")


def up() -> int:
    farm = Farm(Path(os.environ.get("RENDERFARM_VAR_DIR", "var")))
    try:
        farm.prepare()
        return farm.run()
    finally:
        farm.shutdown()
