"""The Celery application of a render worker.

The parent (prefork) process never imports torch: models are loaded in the child by
`worker_process_init`, before it takes its first job. Run one process per device:
`celery -A worker.celery_app worker -Q render -c 1`.
"""

from __future__ import annotations

import logging
import os

# No model hub is ever contacted; huggingface_hub reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from shared.queue import celery_config
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
