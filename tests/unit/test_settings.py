"""One settings object: flat environment names land in the right group, with the documented defaults."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.settings import (
    DEFAULT_RETRY_SCHEDULE,
    LimitSettings,
    ModelSettings,
    Settings,
    WebhookSettings,
    get_settings,
    worker_process_name,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No variable of the calling shell or of another test leaks in; the cache starts and ends empty."""
    for name in list(os.environ):
        if name.startswith("RENDERFARM_") or name in ("DATABASE_URL", "REDIS_URL", "STORAGE_URL"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_defaults() -> None:
    s = Settings()
    assert s.services.database_url == "postgresql+psycopg://renderfarm@127.0.0.1:55432/renderfarm"
    assert s.services.redis_url == "redis://127.0.0.1:56379/0"
    assert s.services.storage_url == "var/objects"
    assert s.services.public_url == "http://127.0.0.1:7861" and s.services.url_expires_seconds == 3600
    assert s.models.models_dir == Path("models") and s.models.default_model is None and s.models.styles_file is None
    assert s.worker.device == "auto" and s.worker.worker_model_names() == []
    assert (s.worker.pipeline_cache_bytes, s.worker.pipeline_cache_models) == (0, 0)
    assert s.limits.max_pixels == 2048 * 2048 and s.limits.max_steps == 150 and s.limits.max_images_per_job == 32
    assert (s.jobs.job_time_limit, s.jobs.lease_seconds, s.jobs.max_attempts) == (600, 60, 3)
    assert s.jobs.republish_after_seconds == 30.0 and s.jobs.sdapi_timeout is None
    assert s.jobs.broker_visibility_timeout == 600 * 2 + 60
    assert s.routing.affinity_routing is True and s.routing.affinity_max_wait_seconds == 15.0
    assert s.gateway.task_sent_events is False
    assert s.admin.admin_key is None and s.admin.sample_seconds == 10.0 and s.admin.metrics_public is False
    assert s.admin.pause_poll_seconds == 5.0 and s.admin.forget_lost_worker_seconds == 3600
    hooks = s.webhooks
    assert hooks.retry_schedule == DEFAULT_RETRY_SCHEDULE and hooks.allow_hosts == ()
    assert (hooks.jitter, hooks.timeout_seconds, hooks.poll_seconds) == (0.2, 15.0, 1.0)
    assert (hooks.progress_interval_seconds, hooks.redispatch_after_seconds, hooks.keep_days) == (0.5, 10.0, 30.0)
    assert hooks.max_retry_after_seconds == 86400.0 and hooks.lease_seconds == 15.0 * 2 + 30


@pytest.mark.parametrize(
    ("name", "value", "group", "field", "expected"),
    [
        ("DATABASE_URL", "postgresql+psycopg://db/x", "services", "database_url", "postgresql+psycopg://db/x"),
        ("RENDERFARM_DATABASE_URL", "postgresql+psycopg://db/y", "services", "database_url",
         "postgresql+psycopg://db/y"),
        ("REDIS_URL", "redis://r:1/2", "services", "redis_url", "redis://r:1/2"),
        ("STORAGE_URL", "s3://bucket", "services", "storage_url", "s3://bucket"),
        ("RENDERFARM_SECRET_KEY", "s3cret", "services", "secret_key", "s3cret"),
        ("RENDERFARM_PUBLIC_URL", "http://files", "services", "public_url", "http://files"),
        ("RENDERFARM_URL_EXPIRES_SECONDS", "60", "services", "url_expires_seconds", 60),
        ("RENDERFARM_MODELS_DIR", "/m", "models", "models_dir", Path("/m")),
        ("RENDERFARM_DEFAULT_MODEL", "demo", "models", "default_model", "demo"),
        ("RENDERFARM_STYLES_FILE", "/s.csv", "models", "styles_file", Path("/s.csv")),
        ("RENDERFARM_WORKER_NAME", "gpu7", "worker", "worker_name", "gpu7"),
        ("RENDERFARM_DEVICE", "cpu", "worker", "device", "cpu"),
        ("RENDERFARM_TORCH_THREADS", "4", "worker", "torch_threads", 4),
        ("RENDERFARM_PIPELINE_CACHE_BYTES", "1000", "worker", "pipeline_cache_bytes", 1000),
        ("RENDERFARM_PIPELINE_CACHE_MODELS", "2", "worker", "pipeline_cache_models", 2),
        ("RENDERFARM_MAX_PIXELS", "100", "limits", "max_pixels", 100),
        ("RENDERFARM_MAX_UPLOAD_BYTES", "5", "limits", "max_upload_bytes", 5),
        ("RENDERFARM_JOB_TIME_LIMIT", "90", "jobs", "job_time_limit", 90),
        ("RENDERFARM_LEASE_SECONDS", "7", "jobs", "lease_seconds", 7),
        ("RENDERFARM_MAX_ATTEMPTS", "5", "jobs", "max_attempts", 5),
        ("RENDERFARM_REPUBLISH_AFTER_SECONDS", "2.5", "jobs", "republish_after_seconds", 2.5),
        ("RENDERFARM_SDAPI_TIMEOUT", "12", "jobs", "sdapi_timeout", 12.0),
        ("RENDERFARM_AFFINITY_ROUTING", "false", "routing", "affinity_routing", False),
        ("RENDERFARM_AFFINITY_MAX_WAIT_SECONDS", "3", "routing", "affinity_max_wait_seconds", 3.0),
        ("RENDERFARM_BATCHING", "0", "batching", "batching", False),
        ("RENDERFARM_BATCH_WINDOW_MS", "250", "batching", "batch_window_ms", 250),
        ("RENDERFARM_MAX_BATCH_IMAGES", "4", "batching", "max_batch_images", 4),
        ("RENDERFARM_BATCH_PIXEL_BUDGET", "1048576", "batching", "batch_pixel_budget", 1048576),
        ("RENDERFARM_ADMIN_KEY", "adm", "admin", "admin_key", "adm"),
        ("RENDERFARM_SAMPLE_SECONDS", "0", "admin", "sample_seconds", 0.0),
        ("RENDERFARM_SAMPLE_RETENTION_HOURS", "1", "admin", "sample_retention_hours", 1),
        ("RENDERFARM_FORGET_LOST_WORKER_SECONDS", "9", "admin", "forget_lost_worker_seconds", 9),
        ("RENDERFARM_METRICS_PUBLIC", "true", "admin", "metrics_public", True),
        ("RENDERFARM_PAUSE_POLL_SECONDS", "0.5", "admin", "pause_poll_seconds", 0.5),
        ("RENDERFARM_WEBHOOK_TIMEOUT_SECONDS", "5", "webhooks", "timeout_seconds", 5.0),
        ("RENDERFARM_WEBHOOK_PROGRESS_INTERVAL_SECONDS", "2", "webhooks", "progress_interval_seconds", 2.0),
        ("RENDERFARM_WEBHOOK_REDISPATCH_SECONDS", "2", "webhooks", "redispatch_after_seconds", 2.0),
        ("RENDERFARM_WEBHOOK_MAX_RETRY_AFTER_SECONDS", "60", "webhooks", "max_retry_after_seconds", 60.0),
        ("RENDERFARM_WEBHOOK_KEEP_DAYS", "1", "webhooks", "keep_days", 1.0),
        ("RENDERFARM_TASK_SENT_EVENTS", "1", "gateway", "task_sent_events", True),
    ],
)
def test_environment_names_map_into_their_group(
    clean_env: pytest.MonkeyPatch, name: str, value: str, group: str, field: str, expected: object
) -> None:
    clean_env.setenv(name, value)
    assert getattr(getattr(Settings(), group), field) == expected


def test_worker_models_and_process_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RENDERFARM_WORKER_MODELS", " a.safetensors, ,b ")
    clean_env.setenv("RENDERFARM_WORKER_NAME", "gpu1")
    settings = Settings()
    assert settings.worker.worker_model_names() == ["a.safetensors", "b"]
    assert worker_process_name(settings, 42) == "gpu1:42"


def test_a_group_reads_no_json_blob_under_its_own_name(clean_env: pytest.MonkeyPatch) -> None:
    """The root is no settings source: variables named like a group (WORKER, MODELS) are somebody else's."""
    clean_env.setenv("WORKER", "{not json")
    clean_env.setenv("RENDERFARM_JOBS", '{"lease_seconds": 1}')
    assert Settings().jobs.lease_seconds == 60


def test_groups_built_by_hand_for_tests(tmp_path: Path) -> None:
    settings = Settings(models=ModelSettings(models_dir=tmp_path), limits=LimitSettings(max_side=64))
    assert settings.models.models_dir == tmp_path and settings.limits.max_side == 64
    assert settings.limits.max_steps == 150  # the rest keeps its defaults
    with pytest.raises(ValidationError):
        settings.limits.max_side = 1  # type: ignore[misc]  # frozen: a process's settings do not drift


def test_webhook_schedule_and_allow_hosts_parsing(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RENDERFARM_WEBHOOK_RETRY_SCHEDULE", " 0.2, 1,,30 ")
    clean_env.setenv("RENDERFARM_WEBHOOK_ALLOW_HOSTS", "127.0.0.1, LocalHost ,,10.0.0.0/8")
    hooks = WebhookSettings()
    assert hooks.retry_schedule == (0.2, 1.0, 30.0)
    assert hooks.allow_hosts == ("127.0.0.1", "localhost", "10.0.0.0/8")


def test_webhook_empty_values_mean_defaults_and_knobs_are_clamped(clean_env: pytest.MonkeyPatch) -> None:
    for name in ("RETRY_SCHEDULE", "TIMEOUT_SECONDS", "ALLOW_HOSTS", "REDISPATCH_SECONDS"):
        clean_env.setenv(f"RENDERFARM_WEBHOOK_{name}", "  ")
    clean_env.setenv("RENDERFARM_WEBHOOK_JITTER", "3")
    clean_env.setenv("RENDERFARM_WEBHOOK_POLL_SECONDS", "0")
    hooks = WebhookSettings()
    assert hooks.retry_schedule == DEFAULT_RETRY_SCHEDULE and hooks.timeout_seconds == 15.0
    assert hooks.allow_hosts == () and hooks.redispatch_after_seconds == 10.0
    assert hooks.jitter == 1.0 and hooks.poll_seconds == 0.05


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RETRY_SCHEDULE", "5,soon", "RENDERFARM_WEBHOOK_RETRY_SCHEDULE must be comma-separated seconds like "
                                     "'5,30,120', got '5,soon'"),
        ("RETRY_SCHEDULE", "5,-1", "RENDERFARM_WEBHOOK_RETRY_SCHEDULE must not contain negative delays, got '5,-1'"),
        ("TIMEOUT_SECONDS", "abc", "RENDERFARM_WEBHOOK_TIMEOUT_SECONDS must be a number of seconds, got 'abc'"),
        ("KEEP_DAYS", "-2", "RENDERFARM_WEBHOOK_KEEP_DAYS must not be negative, got '-2'"),
        ("REDISPATCH_SECONDS", "-1", "RENDERFARM_WEBHOOK_REDISPATCH_SECONDS must not be negative, got '-1'"),
    ],
)
def test_webhook_errors_name_the_variable(clean_env: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    clean_env.setenv(f"RENDERFARM_WEBHOOK_{name}", value)
    with pytest.raises(ValueError) as caught:
        get_settings()
    assert message in str(caught.value)


def test_webhook_settings_by_hand() -> None:
    hooks = WebhookSettings(retry_schedule=(10, 100), timeout_seconds=5, redispatch_after_seconds=1)
    assert hooks.retry_schedule == (10.0, 100.0) and hooks.lease_seconds == 40 and hooks.redispatch_after_seconds == 1
    with pytest.raises(ValueError, match="must not be negative"):
        WebhookSettings(timeout_seconds=-1)


def test_get_settings_is_cached_until_cleared(clean_env: pytest.MonkeyPatch) -> None:
    first = get_settings()
    clean_env.setenv("RENDERFARM_LEASE_SECONDS", "9")
    assert get_settings() is first and first.jobs.lease_seconds == 60  # a process reads its environment once
    get_settings.cache_clear()
    assert get_settings().jobs.lease_seconds == 9
