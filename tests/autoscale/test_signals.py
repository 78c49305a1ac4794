"""Signals from engine pages and gateway demand: the queue-time window, unknown pages, the
gateways' demand documents in Redis (published by the worker's DemandPublisher)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import redis.asyncio as aioredis

from control.autoscale.signals import Endpoint, ModelObservation, QueueTimeWindow, build_signals, total_demand
from gateway.admission import ModelQueues
from gateway.demand import DemandPublisher
from gateway.errors import ApiError
from hpcgate.metrics_text import parse_engine_load
from hpcgate.schemas import HeldRequests, ModelDemand, RedisNames

PAGE = b"""# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 1.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} %d
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} %f
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
"""


def test_queue_time_is_the_rate_of_sum_over_the_rate_of_count_in_the_window() -> None:
    load = parse_engine_load(PAGE % (10, 20.0))
    assert (load.queue_time_count, load.queue_time_sum) == (10.0, 20.0)
    legacy = parse_engine_load(b"vllm:time_in_queue_requests_sum 3.5\nvllm:time_in_queue_requests_count 7\n")
    assert (legacy.queue_time_sum, legacy.queue_time_count) == (3.5, 7.0)
    assert parse_engine_load(b"vllm:num_requests_waiting 1\n").queue_time_sum is None

    w = QueueTimeWindow(30.0)
    w.observe(0.0, 20.0, 10)  # history before the window: 2 s each
    w.observe(10.0, 20.0, 10)
    w.observe(40.0, 80.0, 20)  # 10 more requests waited 6 s each
    assert w.delta() == (60.0, 10.0, 30.0)
    w.observe(45.0, 1.0, 1)  # the engine restarted: counters began again
    assert w.delta() == (0.0, 0.0, 0.0)


def test_a_model_with_an_unreadable_instance_is_unknown_and_a_stalled_queue_is_seen() -> None:
    eps = (Endpoint(1, "n", 1), Endpoint(2, "n", 2))
    obs = ModelObservation(ready=eps, pending=1, oldest_pending_s=12.0)
    w1, w2 = QueueTimeWindow(30.0), QueueTimeWindow(30.0)
    for t in (0.0, 30.0):
        w1.observe(t, 5.0, 5)  # nothing scheduled in 30 s...
        w2.observe(t, 5.0, 5)
    page = parse_engine_load(PAGE % (5, 5.0))  # ...while 3 wait on each
    s = build_signals(
        30.0, obs, {1: page, 2: None}, {1: w1, 2: w2}, held=0, oldest_held_s=None, min_window_s=15
    )
    assert not s.known and s.waiting == 3.0
    s = build_signals(
        30.0, obs, {1: page, 2: page}, {1: w1, 2: w2}, held=2, oldest_held_s=1.5, min_window_s=15
    )
    assert s.known and (s.waiting, s.running, s.kv_usage) == (6.0, 8.0, 0.5)
    assert s.queue_time_s is None and s.stalled_s == 30.0
    assert (s.ready, s.pending, s.held, s.oldest_held_s) == (2, 1, 2, 1.5)


def test_demand_is_summed_over_gateways_and_aliases_and_stale_documents_ignored() -> None:
    now = time.time()
    docs = [
        ModelDemand(at=now, models={"m": HeldRequests(2, 3.0), "other": HeldRequests(9, 99.0)}),
        ModelDemand(at=now - 1, models={"alias": HeldRequests(1, 7.0)}),
        ModelDemand(at=now - 30, models={"m": HeldRequests(5, 50.0)}),
    ]
    assert total_demand("m", ("alias",), docs, now, 5.0) == (3, 7.0)
    assert total_demand("m", (), [], now, 5.0) == (0, None)


async def test_a_gateway_worker_publishes_its_held_requests_with_an_expiry(
    redis_url: str, redis_prefix: str
) -> None:
    loop = asyncio.get_running_loop()
    queues = ModelQueues(loop)
    prefix = f"{redis_prefix}demand-test:"
    pub = DemandPublisher(redis_url, prefix, queues.demand, ttl_s=3)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await pub.publish_once(loop.time())  # nothing held: nothing written
        assert [k async for k in redis.scan_iter(match=f"{RedisNames(prefix).demand_prefix}*")] == []
        waiter = asyncio.ensure_future(queues.wait("m", max_len=4, timeout=30))
        await asyncio.sleep(0)
        await pub.publish_once(loop.time() + 2.0)
        [key] = [k async for k in redis.scan_iter(match=f"{RedisNames(prefix).demand_prefix}*")]
        doc = msgspec.json.decode(await redis.get(key), type=ModelDemand)
        assert doc.models["m"].held == 1 and doc.models["m"].oldest_s >= 2.0
        assert 0 < await redis.ttl(key) <= 3
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError, ApiError):
            await waiter
        await pub.publish_once(loop.time())  # the queue emptied: one empty document clears it
        doc = msgspec.json.decode(await redis.get(key), type=ModelDemand)
        assert doc.models == {}
    finally:
        await redis.aclose()
        await pub.close()
