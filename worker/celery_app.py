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

from shared.queue import QueueName, celery_config
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
    from worker.runtime import start_runtime

    start_runtime(get_settings())


@worker_process_shutdown.connect
def _stop_runtime(**_: object) -> None:
    from worker.runtime import stop_runtime

    stop_runtime()


def _shutting_down(consumer: Any) -> bool:
    from celery import bootsteps
    from celery.worker import state

    return bool(state.should_stop or state.should_terminate) or consumer.blueprint.state != bootsteps.RUN


def _follow_pause_flag(consumer: Any, *, at_start: bool = False) -> dict[str, Any]:
    """Consume the render queue unless the farm is paused (the flag in Postgres decides; see shared.farm_state).

    At start-up the event loop has not polled the queue yet, so cancelling at once means not a single
    message is taken; from a control command the change is scheduled on the loop, as Celery's own are.
    """
    from shared.farm_state import read_paused_flag

    serves = getattr(consumer, "renderfarm_serves_render", None)
    if serves is None:  # first call, from worker_ready: remember whether `-Q` named the render queue
        serves = consumer.renderfarm_serves_render = QueueName.RENDER in consumer.app.amqp.queues.consume_from
    if not serves:
        return {"ok": "not a render worker"}
    if _shutting_down(consumer):  # a worker in warm shutdown must not start consuming again
        return {"ok": "shutting down"}
    paused = read_paused_flag(get_settings().database_url)
    consuming = consumer.task_consumer.consuming_from(QueueName.RENDER)
    run = (lambda fn, *args: fn(*args)) if at_start else consumer.call_soon
    if paused and consuming:
        run(consumer.cancel_task_queue, QueueName.RENDER)
    elif not paused and not consuming:
        run(consumer.add_task_queue, QueueName.RENDER)
    return {"ok": "paused" if paused else "consuming", "paused": paused}


@worker_ready.connect
def _honour_pause_at_start(sender: Any = None, **_: object) -> None:
    """A worker that starts while the farm is paused missed the broadcast: it reads the flag itself,
    then re-reads it periodically so that a broadcast missed later costs seconds, not a paused farm at work."""
    from shared.admin_settings import get_admin_settings

    try:
        _follow_pause_flag(sender, at_start=True)
    except Exception:  # Postgres unreachable: consume (no job can be claimed without it); the poll corrects it
        log.warning("could not read the pause flag at start-up", exc_info=True)

    def poll() -> None:
        try:
            _follow_pause_flag(sender)
        except Exception:  # Postgres unreachable: keep the current state, try again next time
            log.warning("could not read the pause flag", exc_info=True)

    sender.timer.call_repeatedly(get_admin_settings().pause_poll_seconds, poll)


@control_command()
def renderfarm_sync_pause(state: Any, **_: object) -> dict[str, Any]:
    """Broadcast by the API to render workers on pause and resume: re-read the flag now and follow it."""
    return _follow_pause_flag(state.consumer)
