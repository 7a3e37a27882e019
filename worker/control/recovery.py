"""The fleet's recovery pass, run by every render worker; compare-and-set keeps concurrent passes safe.

- A running job whose lease expired (its worker died) goes back to `queued`, or to `failed` with
  `worker_lost` once it has used all its attempts.
- A queued job that was never published (the API died between commit and publish, or the broker was
  down) is published.
- A queued job that has waited in a model's queue (routing by affinity) longer than the deferral
  bound is published to the shared queue, where any worker may take it.
- When the broker holds fewer messages than there are queued jobs (Redis restarted empty, a message
  lost), queued jobs older than `republish_after` are published again.
- When the broker came back without its data (a mark this loop keeps in Redis is gone, or Redis' run id
  changed), every queued job is published again at once, not after `republish_after`: the loop checks the
  broker every second, so a flushed or restarted-empty Redis costs about a second. Duplicate messages are
  harmless: a job is claimed by compare-and-set, so a second message finds nothing to claim.

Every transition is a `shared.jobs.lifecycle` function. Everything re-published goes to the shared
`render` queue: a recovery path must not depend on which workers hold which models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import redis
from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import lifecycle
from shared.queueing.fleet import broker_queue, live_worker_infos
from shared.queueing.queues import QueueName
from shared.queueing.routing import held_by_every_worker, model_queue_keys, orphan_model_queues
from worker.control.periodic import Periodic

log = logging.getLogger(__name__)


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


BROKER_MARK = "renderfarm:broker-mark"  # kept in Redis by every worker; gone means Redis lost its data
BROKER_CHECK_SECONDS = 1.0


class RecoveryLoop(Periodic):
    """The recovery pass every `period` seconds, and a look at the broker every second in between."""

    def __init__(self, session_factory: sessionmaker[Session], redis_url: str, period: float,
                 republish_after: float, affinity_max_wait: float) -> None:
        super().__init__("recovery", min(period, BROKER_CHECK_SECONDS))
        self.session_factory = session_factory
        self.full_period = period
        self.republish_after = republish_after
        self.affinity_max_wait = affinity_max_wait
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._run_id: str | None = None
        self._marked = False
        self._since_full = period  # the first tick runs a full pass
        self._broker_down = False

    def broker_lost_data(self) -> bool:
        """True once when Redis is back without what it held: our mark is gone, or its run id changed."""
        run_id = str(self._redis.info("server").get("run_id", ""))
        created = bool(self._redis.set(BROKER_MARK, run_id, nx=True))
        lost = (self._run_id is not None and run_id != self._run_id) or (created and self._marked)
        self._run_id, self._marked = run_id, True
        return lost

    def republish_lost(self) -> int:
        """Every queued job the broker may have lost, published again now."""
        with self.session_factory() as session:
            ids = lifecycle.republish_stale(session, self.broker_depth(), republish_after=0.0)
            lifecycle.commit(session)
        log.warning("the broker lost its messages (Redis flushed or restarted empty): %d queued jobs published "
                    "again", len(ids))
        return len(ids)

    def drop_orphan_queues(self) -> None:
        """Model queues that no live worker consumes are deleted: their jobs go to the shared queue after
        the deferral bound, so the queues neither linger in Redis nor hide a lost message."""
        orphans = orphan_model_queues(model_queue_keys(self._redis), live_worker_infos(self._redis))
        if orphans:
            self._redis.delete(*orphans)

    def broker_depth(self) -> int:
        """Messages waiting in the render queues and the training queue, plus those delivered but not yet
        acknowledged (one hash for every queue)."""
        queue = broker_queue(self._redis)
        return queue.waiting + broker_queue(self._redis, QueueName.TRAIN).waiting + queue.unacked

    def tick(self) -> None:
        try:
            lost = self.broker_lost_data()
        except redis.RedisError as exc:  # an expected outage: one line, not a traceback per second
            if not self._broker_down:
                log.warning("the broker is unreachable (%s); recovery waits for it", exc)
            self._broker_down = True
            return
        if self._broker_down:
            log.info("the broker is reachable again")
            self._broker_down = False
        if lost:
            self.republish_lost()
        self._since_full += self.period
        if self._since_full + 1e-9 < self.full_period:
            return
        self._since_full = 0.0
        self.full_pass()

    def full_pass(self) -> None:
        self.drop_orphan_queues()
        # A job for a model every worker holds gains nothing by moving to the shared queue: it is not deferred.
        held_everywhere = held_by_every_worker(live_worker_infos(self._redis))
        with self.session_factory() as session:
            recover(session, self.broker_depth, self.republish_after, self.affinity_max_wait, held_everywhere)
