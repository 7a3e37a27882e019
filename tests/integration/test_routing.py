"""Routing by model affinity: queue names, the router reading real heartbeats in Redis, the deferral bound."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy.orm import Session

from devtools.embedded import free_port
from shared.clock import utcnow
from shared.jobs import lifecycle
from shared.queueing.fleet import WORKER_KEY_PREFIX, broker_queue
from shared.queueing.routing import (
    AffinityRouter,
    advertised_models,
    affinity_key,
    desired_queues,
    disk_key,
    held_by_every_worker,
    is_model_queue,
    model_queue,
    orphan_model_queues,
    worker_keys,
)

PARAMS = {"mode": "txt2img", "prompt": "p", "seed": 5, "batch_size": 1, "n_iter": 1}


def test_model_queues_are_stable_safe_names() -> None:
    name = "sub folder/Model: v1.5 [abc]"
    assert model_queue(name) == model_queue(name) != model_queue("other")
    assert is_model_queue(model_queue(name)) and not is_model_queue("render") and not is_model_queue("webhooks")
    assert model_queue(name).replace(".", "").isalnum()


def test_only_ready_workers_advertise() -> None:
    infos = [{"ready": True, "models": ["a", "b"]}, {"ready": False, "models": ["c"]}, {"ready": True}]
    assert advertised_models(infos) == {"a", "b"}


def test_models_held_by_every_ready_worker() -> None:
    infos = [{"ready": True, "models": ["a", "b"]}, {"ready": True, "models": ["b"]}, {"ready": False}]
    assert held_by_every_worker(infos) == {"b"}
    assert held_by_every_worker([{"ready": False, "models": ["a"]}]) == set()


def test_orphan_model_queues_are_those_nobody_holds() -> None:
    held, gone = model_queue("a"), model_queue("gone")
    keys = [held, gone, f"{gone}\x06\x163", f"{held}\x06\x166"]
    assert orphan_model_queues(keys, [{"ready": False, "models": ["a"]}]) == [gone, f"{gone}\x06\x163"]


def test_desired_queues_follow_pause_and_models() -> None:
    assert desired_queues(True, ["a"], affinity=True) == set()
    assert desired_queues(False, ["a"], affinity=True) == {"render", model_queue("a")}
    assert desired_queues(False, ["a"], affinity=False) == {"render"}


@pytest.fixture
def client(redis_db_url: Callable[[], str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db_url())
    client.flushdb()
    yield client
    client.flushdb()


def test_router_reads_live_heartbeats(client: redis.Redis) -> None:
    router = AffinityRouter(client, cache_seconds=0)
    assert router.queue_for("a") == "render"  # no worker at all
    client.set(WORKER_KEY_PREFIX + "w1:1", json.dumps({"name": "w1:1", "ready": True, "models": ["a"]}))
    client.set(WORKER_KEY_PREFIX + "w2:2", json.dumps({"name": "w2:2", "ready": False, "models": ["b"]}))
    assert router.queue_for("a") == model_queue("a")
    assert router.queue_for("b") == "render"  # its holder is still warming up
    assert AffinityRouter(client, enabled=False).queue_for("a") == "render"
    client.delete(WORKER_KEY_PREFIX + "w1:1")  # the holder's heartbeat expired
    assert router.queue_for("a") == "render"


def test_router_falls_back_to_the_shared_queue_when_redis_is_down() -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    assert AffinityRouter(dead).queue_for("a") == "render"


def test_broker_depth_counts_model_queues(client: redis.Redis) -> None:
    client.rpush("render", "m1")
    client.rpush(model_queue("a"), "m2", "m3")
    client.rpush(f"{model_queue('a')}\x06\x163", "m4")
    assert broker_queue(client).waiting == 4


def test_deferral_is_bounded(session: Session) -> None:
    def job(route: str, waited: float):
        created = lifecycle.submit(session, owner="t", api_key_id=None, params=PARAMS, model_name="a", route=route)
        created.published_at = utcnow() - timedelta(seconds=waited)
        return created

    overdue, fresh, shared = job(model_queue("a"), 20), job(model_queue("a"), 1), job("render", 60)
    session.commit()
    claimed = lifecycle.republish_deferred(session, max_wait_seconds=15)
    session.commit()
    assert overdue.id in claimed and fresh.id not in claimed and shared.id not in claimed
    session.refresh(overdue)
    assert overdue.route == "render"
    assert lifecycle.republish_deferred(session, max_wait_seconds=15).count(overdue.id) == 0  # re-published once only


def test_jobs_for_a_model_every_worker_holds_are_not_deferred(session: Session) -> None:
    created = lifecycle.submit(session, owner="t", api_key_id=None, params=PARAMS, model_name="everywhere",
                               route=model_queue("everywhere"))
    created.published_at = utcnow() - timedelta(seconds=60)
    session.commit()
    assert created.id not in lifecycle.republish_deferred(session, max_wait_seconds=15, keep={"everywhere"})
    session.commit()
    assert created.id in lifecycle.republish_deferred(session, max_wait_seconds=15, keep={"other"})
    session.commit()


def test_a_controlnet_job_prefers_a_worker_holding_its_controlnet_beside_the_checkpoint(client: redis.Redis) -> None:
    router = AffinityRouter(client, cache_seconds=0)
    client.set(WORKER_KEY_PREFIX + "w1:1", json.dumps({"ready": True, "models": ["a"], "controlnets": []}))
    assert router.queue_for("a", "canny [0123abcd]") == model_queue("a")  # the checkpoint's holder, still warm
    client.set(WORKER_KEY_PREFIX + "w2:2", json.dumps({"ready": True, "models": ["a"],
                                                       "controlnets": ["canny [0123abcd]"]}))
    pair = affinity_key("a", "canny [0123abcd]")
    assert router.queue_for("a", "canny [0123abcd]") == model_queue(pair) != model_queue("a")
    assert router.queue_for("a") == model_queue("a") and router.queue_for("b", "canny [0123abcd]") == "render"
    # The holder of the pair consumes its queue; the other worker does not (it would load the ControlNet).
    holder = worker_keys({"models": ["a"], "controlnets": ["canny [0123abcd]"]})
    assert model_queue(pair) in desired_queues(False, holder, affinity=True)
    assert model_queue(pair) not in desired_queues(False, worker_keys({"models": ["a"]}), affinity=True)


def test_a_pair_queue_held_by_one_worker_only_is_still_deferral_bounded(session: Session) -> None:
    """Every worker holds checkpoint "a", one of them its ControlNet too: a job in the pair's queue waits at most
    the bound (only the checkpoint's own queue is served by everyone)."""
    infos = [{"ready": True, "models": ["a"], "controlnets": ["cn"]}, {"ready": True, "models": ["a"]}]
    keep = held_by_every_worker(infos)
    assert keep == {"a"}
    created = lifecycle.submit(session, owner="t", api_key_id=None, params=PARAMS, model_name="a",
                               route=model_queue(affinity_key("a", "cn")))
    created.published_at = utcnow() - timedelta(seconds=60)
    session.commit()
    assert created.id in lifecycle.republish_deferred(session, max_wait_seconds=15, keep=keep)
    session.commit()
    assert orphan_model_queues([model_queue(affinity_key("a", "cn"))], infos) == []
    assert orphan_model_queues([model_queue(affinity_key("a", "cn"))], infos[1:]) != []


def test_a_job_prefers_a_worker_holding_its_checkpoint_warm_then_on_disk(client: redis.Redis) -> None:
    router = AffinityRouter(client, cache_seconds=0)
    client.set(WORKER_KEY_PREFIX + "w1:1", json.dumps({"ready": True, "models": ["b"], "models_on_disk": ["a", "b"]}))
    assert router.queue_for("a") == "render"  # the only worker: its disk queue would be the shared queue
    client.set(WORKER_KEY_PREFIX + "w3:3", json.dumps({"ready": True, "models": [], "models_on_disk": ["b"]}))
    assert router.queue_for("a") == model_queue(disk_key("a")) != model_queue("a")  # no download, a load
    assert router.queue_for("c") == "render"  # nobody has it: any worker pulls it
    client.set(WORKER_KEY_PREFIX + "w2:2", json.dumps({"ready": True, "models": ["a"], "models_on_disk": ["a"]}))
    assert router.queue_for("a") == model_queue("a")  # warm beats on disk
    assert model_queue(disk_key("a")) in desired_queues(False, worker_keys({"models": [], "models_on_disk": ["a"]}),
                                                        affinity=True)
