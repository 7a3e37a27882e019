"""The Celery configuration the API and the workers share: what a submit costs the broker."""

from __future__ import annotations

from shared.queueing.queues import celery_config
from shared.settings import GatewaySettings, Settings


def test_a_submit_sends_no_task_sent_event_unless_asked() -> None:
    assert celery_config(Settings())["task_send_sent_event"] is False
    on = Settings(gateway=GatewaySettings(task_sent_events=True))
    assert celery_config(on)["task_send_sent_event"] is True
    assert celery_config(on)["worker_send_task_events"] is True  # the workers' own events stay on either way
