"""The webhook sender: a light Celery app of its own, on the `webhooks` queue.

It is separate from `worker.celery_app` so that render workers never wait on HTTP and the sender
never loads torch or models (nothing in this module's imports does). Each child process also runs
a poller that dispatches due deliveries every second: retries live in Postgres rows, not in
broker ETAs, so a Redis restart or a lost message costs seconds, never an event.
Run: `celery -A worker.webhook_sender.app worker -Q webhooks -c 4`.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from shared.db.session import get_session_factory, session_scope
from shared.queueing.queues import QueueName, TaskName, celery_config
from shared.settings import get_settings
from shared.webhooks.outbox import publish_deliveries
from worker.webhook_sender.delivery import attempt_delivery, dispatch_due, prune_deliveries

log = logging.getLogger(__name__)
PRUNE_EVERY_SECONDS = 600.0

app = Celery("renderfarm-webhooks")
app.conf.update(celery_config(get_settings()))
app.conf.update(
    task_default_queue=QueueName.WEBHOOKS,
    # One attempt is bounded by the HTTP timeout (15 s); these only catch a wedged process.
    task_soft_time_limit=120,
    task_time_limit=150,
)


# The message is only a hint that a row may be due: the row, its lease and the poller make delivery
# durable, so the task acknowledges early and never holds a message across an HTTP call.
@app.task(name=TaskName.DELIVER_WEBHOOK, acks_late=False, ignore_result=True)
def deliver_webhook(delivery_id: int) -> str:
    session = get_session_factory()()
    try:
        return attempt_delivery(session, delivery_id).value
    finally:
        session.close()


class DuePoller:
    """Every `poll_seconds`, hand due deliveries (first attempts whose message was lost, and retries) to the queue."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-due-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def poll_once(self) -> int:
        with session_scope() as session:
            ids = dispatch_due(session)
        return publish_deliveries(ids)

    def _run(self) -> None:
        next_prune = time.monotonic() + random.uniform(0, PRUNE_EVERY_SECONDS)  # pollers spread their pruning
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
                    with session_scope() as session:
                        prune_deliveries(session)
            except Exception:  # Postgres or Redis away: the rows wait, and the next tick tries again
                log.exception("webhook poller: could not dispatch due deliveries; retrying in %.1fs", self.interval)


_poller: DuePoller | None = None


@worker_process_init.connect
def _start_poller(**_: object) -> None:
    global _poller
    _poller = DuePoller(get_settings().webhooks.poll_seconds)
    _poller.start()


@worker_process_shutdown.connect
def _stop_poller(**_: object) -> None:
    if _poller is not None:
        _poller.stop()
