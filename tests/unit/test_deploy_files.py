"""The deployment files encode reliability decisions (docs/architecture.md, rules 7 and 8); keep them honest.

The compose file is checked structurally with PyYAML everywhere. ``docker compose config``
validates it against the real schema only where the compose plugin exists (this project's
CI machines have a docker client without it), and the test says so when it skips.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.storage import S3ObjectStore, store_from_url

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
JOB_TIME_LIMIT_S = 600

_DEFAULTED_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Resolve ``${VAR:-default}`` as compose does with VAR unset (``$$`` is not used here)."""
    return _DEFAULTED_VARIABLE.sub(lambda m: m.group(2) or "", value)


def _seconds(duration: str | int) -> float:
    """Parse a compose duration such as ``15m``, ``1h30m`` or ``90s``."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: _interpolate(str(value)) for name, value in env.items()}


def test_all_services_present(services: dict[str, Any]) -> None:
    assert {"postgres", "redis", "seaweedfs", "migrate", "api", "worker"} <= set(services)


def test_postgres_has_healthcheck(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_redis_never_evicts_and_persists(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = _command(redis)
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--appendonly") + 1] == "yes"


def test_seaweedfs_serves_s3_with_access_keys(compose: dict[str, Any], services: dict[str, Any]) -> None:
    seaweed = services["seaweedfs"]
    assert seaweed["image"].startswith("chrislusf/seaweedfs")
    command = _command(seaweed)
    assert command[0] == "server" and "-s3" in command
    config_flag = next(part for part in command if part.startswith("-s3.config="))
    target = config_flag.split("=", 1)[1]
    mounted = {c["target"]: c["source"] for c in seaweed["configs"]}
    s3_config = json.loads(_interpolate(compose["configs"][mounted[target]]["content"]))
    credentials = s3_config["identities"][0]["credentials"][0]
    env = _environment(services["api"])
    assert credentials == {"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}


def test_migrate_is_one_shot_after_postgres(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert _command(migrate) == ["alembic", "upgrade", "head"]
    assert str(migrate.get("restart", "no")) == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_api_starts_after_migration(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["build"]["dockerfile"] == "Dockerfile.api"
    assert _command(api) == ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "7861"]
    assert any(str(port).endswith(":7861") for port in api["ports"])
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_worker_command_matches_reliability_settings(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"
    command = _command(worker)
    assert command[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert command[command.index("-Q") + 1] == "render"
    assert command[command.index("-c") + 1] == "1"
    assert "--prefetch-multiplier=1" in command and "-E" in command
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_worker_reserves_one_gpu(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_worker_grace_period_outlasts_job_time_limit(services: dict[str, Any]) -> None:
    worker = services["worker"]
    time_limit = int(_environment(worker)["RENDERFARM_JOB_TIME_LIMIT"])
    assert time_limit == JOB_TIME_LIMIT_S
    assert _seconds(worker["stop_grace_period"]) > time_limit


def test_worker_mounts_models(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert _environment(worker)["RENDERFARM_MODELS_DIR"] == "/models"
    targets = [
        _interpolate(volume).split(":")[1] if isinstance(volume, str) else volume["target"]
        for volume in worker["volumes"]
    ]
    assert "/models" in targets


@pytest.mark.parametrize("name", ["migrate", "api", "worker"])
def test_app_environment(services: dict[str, Any], name: str) -> None:
    env = _environment(services[name])
    assert env["DATABASE_URL"] == "postgresql+psycopg://renderfarm:renderfarm@postgres:5432/renderfarm"
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["STORAGE_URL"] == (
        "s3://renderfarm-images?endpoint=http://seaweedfs:8333&create_bucket=1"
        "&public_endpoint=http://localhost:8333"
    )
    assert "change-me" in env["RENDERFARM_SECRET_KEY"]
    assert "${RENDERFARM_ADMIN_KEY" in str(services[name]["environment"]["RENDERFARM_ADMIN_KEY"])


def test_compose_storage_url_parses(services: dict[str, Any]) -> None:
    env = _environment(services["worker"])
    store = store_from_url(env["STORAGE_URL"], secret=b"x", public_base_url="http://localhost:7861")
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.endpoint_url, store.public_endpoint_url, store.create_bucket) == (
        "renderfarm-images",
        "http://seaweedfs:8333",
        "http://localhost:8333",
        True,
    )


def test_docker_compose_config_validates() -> None:
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"docker compose unavailable: {e}")
    if probe.returncode != 0:
        pytest.skip(f"docker compose plugin unavailable: {(probe.stderr or probe.stdout).strip()}")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def _dockerfile(name: str) -> str:
    path = ROOT / name
    assert path.is_file(), f"{name} is missing"
    # Join continuation lines so each instruction reads as one line.
    return re.sub(r"\\\n\s*", " ", path.read_text())


def _copied_sources(text: str) -> set[str]:
    sources: set[str] = set()
    for line in text.splitlines():
        if line.startswith("COPY "):
            sources.update(part.rstrip("/") for part in line.split()[1:-1] if not part.startswith("--"))
    return sources


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfiles_install_project_as_non_root(name: str) -> None:
    text = _dockerfile(name)
    assert {
        "api",
        "worker",
        "shared",
        "migrations",
        "alembic.ini",
        "pyproject.toml",
        "README.md",
    } <= _copied_sources(text)
    assert re.search(r"^RUN .*pip install .*--extra-index-url \"?\$\{?TORCH_INDEX_URL", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_api_dockerfile() -> None:
    text = _dockerfile("Dockerfile.api")
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert 'CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "7861"]' in text


def test_worker_dockerfile() -> None:
    text = _dockerfile("Dockerfile.worker")
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M)
    assert base and ("nvidia/cuda" in base.group(1) or "pytorch/pytorch" in base.group(1))
    assert "-runtime" in base.group(1)
    assert "python3.11" in text
    assert re.search(
        r'^CMD \["celery", "-A", "worker\.celery_app", "worker", "-Q", "render", "-c", "1"', text, re.M
    )


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "var", "models", ".git", "__pycache__"} <= entries
    # Nothing a Dockerfile copies may be ignored.
    copied = _copied_sources(_dockerfile("Dockerfile.api")) | _copied_sources(
        _dockerfile("Dockerfile.worker")
    )
    assert not copied & entries
