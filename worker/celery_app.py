"""The Celery application of a render worker.

The parent (prefork) process never imports torch: models are loaded in the child by
`worker_process_init`, before it takes its first job. Run one process per device:
`celery -A worker.celery_app worker -Q render -c 1`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

# No model hub is ever contacted; huggingface_hub reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from celery.worker.control import control_command

from shared.queueing.queues import celery_config
from shared.settings import get_settings

log = logging.getLogger(__name__)

app = Celery("renderfarm")
app.conf.update(celery_config(get_settings()))
app.conf.update(
    imports=["worker.tasks"],
    # Loading checkpoints in the child takes longer than Celery's default 4 s start-up window.
    worker_proc_alive_timeout=900,
    worker_cancel_long_running_tasks_on_connection_loss=False,
)


@worker_process_init.connect
def _start_runtime(**_: object) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.runtime import start_runtime

    start_runtime(get_settings(), time_limit_errors=(SoftTimeLimitExceeded,))


@worker_process_shutdown.connect
def _stop_runtime(**_: object) -> None:
    from worker.runtime import stop_runtime

    stop_runtime()


def _queue_sync(consumer: Any) -> Any:
    from worker.queue_sync import QueueSync

    sync = getattr(consumer, "renderfarm_queue_sync", None)
    if sync is None:  # first call, from worker_ready: remembers whether `-Q` named the render queue
        sync = consumer.renderfarm_queue_sync = QueueSync(consumer, get_settings())
    return sync


@worker_ready.connect
def _follow_flags_from_start(sender: Any = None, **_: object) -> None:
    """A worker that starts while the farm is paused missed the broadcast: it reads the flag itself, then
    re-reads it periodically so that a broadcast missed later costs seconds, not a paused farm at work. The
    queues of the models its render process holds are followed every second (routing by model affinity)."""
    sync = _queue_sync(sender)
    if not sync.serves_jobs:
        return
    try:
        sync.read_pause_flag()
    except Exception:  # Postgres unreachable: consume (no job can be claimed without it); the poll corrects it
        log.warning("could not read the pause flag at start-up", exc_info=True)
    sync.sync(at_start=True)

    def poll_pause() -> None:
        try:
            sync.read_pause_flag()
            sync.sync()
        except Exception:  # Postgres unreachable: keep the current state, try again next time
            log.warning("could not read the pause flag", exc_info=True)

    def poll_models() -> None:
        try:
            sync.sync()
        except Exception:
            log.warning("could not follow the held models' queues", exc_info=True)

    sender.timer.call_repeatedly(get_settings().admin.pause_poll_seconds, poll_pause)
    sender.timer.call_repeatedly(1.0, poll_models)


@control_command()
def renderfarm_sync_pause(state: Any, **_: object) -> dict[str, Any]:
    """Broadcast by the API to render workers on pause and resume: re-read the flag now and follow it."""
    sync = _queue_sync(state.consumer)
    if sync.serves_jobs:
        sync.read_pause_flag()
    return sync.sync()
