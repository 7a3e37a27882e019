"""The fleet's recovery pass, run by every render worker; compare-and-set keeps concurrent passes safe.

- A running job whose lease expired (its worker died) goes back to `queued`, or to `failed` with
  `worker_lost` once it has used all its attempts.
- A queued job that was never published (the API died between commit and publish, or the broker was
  down) is published.
- A queued job that has waited in a model's queue (routing by affinity) longer than the deferral
  bound is published to the shared queue, where any worker may take it.
- When the broker holds fewer messages than there are queued jobs (Redis restarted empty, a message
  lost), queued jobs older than `republish_after` are published again.

Every transition is a `shared.jobs.lifecycle` function. Everything re-published goes to the shared
`render` queue: a recovery path must not depend on which workers hold which models.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import redis
from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import lifecycle
from shared.queueing.fleet import broker_queue, live_worker_infos
from shared.queueing.routing import held_by_every_worker, model_queue_keys, orphan_model_queues
from worker.control.periodic import Periodic


def recover(
    session: Session,
    broker_depth: Callable[[], int] | None = None,
    republish_after: float = 30.0,
    affinity_max_wait: float = 15.0,
    keep_deferred: Collection[str] = (),
) -> int:
    """One pass; returns how many jobs were published again. `broker_depth` counts the broker's waiting
    and unacknowledged messages, read after this pass's own messages went out (None: skip that check)."""
    requeued, _failed = lifecycle.expire_leases(session)
    ids = requeued + lifecycle.republish_unpublished(session)
    ids += lifecycle.republish_deferred(session, affinity_max_wait, keep=keep_deferred)
    lifecycle.commit(session)
    if broker_depth is not None:
        ids += lifecycle.republish_stale(session, broker_depth(), republish_after)
        lifecycle.commit(session)
    return len(ids)


class RecoveryLoop(Periodic):
    def __init__(self, session_factory: sessionmaker[Session], redis_url: str, period: float,
                 republish_after: float, affinity_max_wait: float) -> None:
        super().__init__("recovery", period)
        self.session_factory = session_factory
        self.republish_after = republish_after
        self.affinity_max_wait = affinity_max_wait
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def drop_orphan_queues(self) -> None:
        """Model queues that no live worker consumes are deleted: their jobs go to the shared queue after
        the deferral bound, so the queues neither linger in Redis nor hide a lost message."""
        orphans = orphan_model_queues(model_queue_keys(self._redis), live_worker_infos(self._redis))
        if orphans:
            self._redis.delete(*orphans)

    def broker_depth(self) -> int:
        """Messages waiting in the render queues plus those delivered but not yet acknowledged."""
        queue = broker_queue(self._redis)
        return queue.waiting + queue.unacked

    def tick(self) -> None:
        self.drop_orphan_queues()
        # A job for a model every worker holds gains nothing by moving to the shared queue: it is not deferred.
        held_everywhere = held_by_every_worker(live_worker_infos(self._redis))
        with self.session_factory() as session:
            recover(session, self.broker_depth, self.republish_after, self.affinity_max_wait, held_everywhere)
