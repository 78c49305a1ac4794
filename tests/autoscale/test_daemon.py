"""The autoscaler's reconcile pass against real PostgreSQL, Redis and simulators, and its leader
lock across two real processes (one killed with -9).

The autoscaler acts on every model of its database, so this module has a database of its own.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from control.autoscale.daemon import Autoscaler, make_http
from control.autoscale.settings import AutoscalerSettings
from hpcgate.schemas import HeldRequests, ModelDemand, RedisNames
from tests.autoscale.conftest import add_model, add_ready_endpoint, clear_models
from tests.jobs.stack import free_port, start_daemon
from tests.support.services import unique_name
from tests.support.sim import sim_process


@contextlib.asynccontextmanager
async def autoscaler(dsn: str, prefix: str, **policy: object) -> AsyncIterator[Autoscaler]:
    settings = msgspec.convert(
        {"database_url": dsn, "redis_prefix": prefix, "scrape_timeout_s": 1.0, **policy}, AutoscalerSettings
    )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    http = make_http(settings)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield Autoscaler(settings, pool, http, redis)
    finally:
        await pool.close()
        await http.aclose()
        await redis.aclose()


async def test_unknown_load_holds_and_known_idleness_scales_down_with_history(
    dsn: str, redis_prefix: str
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await clear_models(conn)
        async with sim_process("--model", "m-idle") as sim:
            mid = await add_model(conn, "m-idle", lo=1, hi=3, desired=2)
            await add_ready_endpoint(conn, mid, sim.port)
            dead = await add_ready_endpoint(conn, mid, free_port())  # nothing listens there
            async with autoscaler(
                dsn, f"{redis_prefix}idle:", scale_down_stabilise_s=0.0, cooldown_s=0.0
            ) as a:
                # one instance cannot be read: unknown, never zero load
                for _ in range(3):
                    [out] = await a.reconcile_once()
                    assert (out.changed, out.hold) == (False, "unknown")
                assert await conn.fetchval("SELECT desired_instances FROM ai_model_configurations") == 2
                status = await conn.fetchrow(
                    "SELECT hold, signals FROM ai_model_autoscaling WHERE model_id = $1", mid
                )
                assert status["hold"] == "unknown" and '"known":false' in status["signals"].replace(" ", "")

                # the unreadable instance is drained away: the rest is idle and readable
                await conn.execute(
                    "UPDATE ai_model_endpoints SET draining = true WHERE endpoint_id = $1", dead
                )
                [out] = await a.reconcile_once()
                assert (out.changed, out.desired, out.reason) == (True, 1, "idle_stabilised")
                assert await conn.fetchval("SELECT desired_instances FROM ai_model_configurations") == 1
                [out] = await a.reconcile_once()
                assert (out.changed, out.hold) == (False, "at_min")
        history = await conn.fetch(
            "SELECT from_instances, to_instances, reason, source, signals "
            "FROM ai_model_scaling_decisions WHERE model_id = $1",
            mid,
        )
        assert [(h["from_instances"], h["to_instances"], h["reason"], h["source"]) for h in history] == [
            (2, 1, "idle_stabilised", "autoscaler")
        ]
        assert msgspec.json.decode(history[0]["signals"])["ready"] == 1
    finally:
        await conn.close()


async def test_gateway_demand_in_redis_takes_a_model_from_zero_to_one(dsn: str, redis_prefix: str) -> None:
    prefix = f"{redis_prefix}{unique_name('zero')}:"
    conn = await asyncpg.connect(dsn)
    redis = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        await clear_models(conn)
        mid = await add_model(conn, "m-zero", lo=0, hi=2, desired=0)
        await conn.execute("INSERT INTO ai_model_aliases (alias, model_id) VALUES ('zero-alias', $1)", mid)
        async with autoscaler(dsn, prefix) as a:
            [out] = await a.reconcile_once()
            assert (out.changed, out.desired) == (False, 0)
            # a stale document (a gateway that stopped updating) is not demand
            stale = ModelDemand(at=time.time() - 60, models={"m-zero": HeldRequests(1, 60.0)})
            await redis.set(f"{RedisNames(prefix).demand_prefix}gw0:1", msgspec.json.encode(stale), ex=5)
            [out] = await a.reconcile_once()
            assert out.desired == 0
            # a request held under the alias on another gateway worker
            doc = ModelDemand(at=time.time(), models={"zero-alias": HeldRequests(2, 0.4)})
            await redis.set(f"{RedisNames(prefix).demand_prefix}gw1:2", msgspec.json.encode(doc), ex=5)
            [out] = await a.reconcile_once()
            assert (out.changed, out.desired, out.reason) == (True, 1, "zero_to_one")
        assert await conn.fetchval("SELECT desired_instances FROM ai_model_configurations") == 1
        row = await conn.fetchrow(
            "SELECT reason, detail FROM ai_model_scaling_decisions WHERE model_id = $1", mid
        )
        assert row["reason"] == "zero_to_one" and "2 request(s) held" in row["detail"]
    finally:
        await redis.aclose()
        await conn.close()


async def test_an_operator_change_wins_over_a_decision_made_on_older_data(
    dsn: str, redis_prefix: str
) -> None:
    from control.autoscale import store

    conn = await asyncpg.connect(dsn)
    try:
        await clear_models(conn)
        mid = await add_model(conn, "m-race", lo=0, hi=3, desired=1)
        await conn.execute(
            "UPDATE ai_model_configurations SET desired_instances = 3 WHERE model_id = $1", mid
        )
        applied = await store.apply_decision(
            conn,
            mid,
            1,
            2,
            reason="queue_time_sustained",
            source="autoscaler",
            detail="",
            signals=None,
            keep=10,
        )
        assert not applied
        assert await conn.fetchval("SELECT desired_instances FROM ai_model_configurations") == 3
        assert await conn.fetchval("SELECT count(*) FROM ai_model_scaling_decisions") == 0
        # the history is bounded per model
        for i in range(5):
            assert await store.apply_decision(
                conn,
                mid,
                3 - i % 2,
                2 + i % 2,
                reason="operator",
                source="autoscaler",
                detail=str(i),
                signals=None,
                keep=3,
            )
        kept = await conn.fetch("SELECT detail FROM ai_model_scaling_decisions ORDER BY decision_id")
        assert [r["detail"] for r in kept] == ["2", "3", "4"]
    finally:
        await conn.close()


async def test_two_autoscalers_one_acts_and_the_standby_takes_over_after_kill_9(
    dsn: str, redis_prefix: str
) -> None:
    env = {
        "HPCGATE_DATABASE_URL": dsn,
        "HPCGATE_REDIS_PREFIX": f"{redis_prefix}leader:",
        "HPCGATE_AUTOSCALER_STANDBY_POLL_S": "0.2",
        "HPCGATE_AUTOSCALER_INTERVAL_S": "0.5",
    }
    first = await start_daemon("autoscaler-1", ["control", "autoscaler"], env, "autoscaler_started")
    second = None
    try:
        second = await start_daemon("autoscaler-2", ["control", "autoscaler"], env, "singleton_state")
        await second.wait_event("singleton_state", new="standby")
        assert second.find("autoscaler_started") is None
        await first.kill9()
        started = time.monotonic()
        await second.wait_event("autoscaler_started", timeout=10)
        assert time.monotonic() - started < 5
        assert second.find("singleton_state", old="standby", new="active")
    finally:
        await first.stop()
        if second is not None:
            await second.stop()


async def test_a_schedule_narrows_the_limits_and_its_changes_are_recorded_as_such(
    dsn: str, redis_prefix: str
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await clear_models(conn)
        mid = await add_model(conn, "m-sched", lo=0, hi=3, desired=3)
        # every day, all day, in a zone with daylight saving: at most one instance
        await conn.execute(
            "INSERT INTO ai_model_autoscaling (model_id, schedule) VALUES ($1, $2)",
            mid,
            "daily 00:00-24:00 Europe/Berlin: max 1",
        )
        async with autoscaler(dsn, f"{redis_prefix}sched:") as a:
            [out] = await a.reconcile_once()
            assert (out.changed, out.desired, out.reason) == (True, 1, "schedule")
        row = await conn.fetchrow(
            "SELECT source, detail FROM ai_model_scaling_decisions WHERE model_id = $1", mid
        )
        assert row["source"] == "schedule" and "daily 00:00-24:00 Europe/Berlin: max 1" in row["detail"]
        assert await conn.fetchval("SELECT desired_instances FROM ai_model_configurations") == 1
    finally:
        await conn.close()


async def test_the_expected_start_is_learned_from_the_model_jobs(dsn: str, redis_prefix: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await clear_models(conn)
        mid = await add_model(conn, "m-start", lo=0, hi=2, desired=0)
        for seconds in (30, 40, 90):  # three jobs that took this long from their row to ready
            await conn.execute(
                """INSERT INTO ai_model_endpoint_jobs (model_id, generation, launcher, state,
                       registration_token_hash, registration_expires_at, created_at, ready_at)
                   VALUES ($1, 1, 'local', 'ended', $2, now(), now() - make_interval(secs => $3), now())""",
                mid,
                os.urandom(32),
                float(seconds),
            )
        async with autoscaler(dsn, f"{redis_prefix}start:") as a:
            await a.reconcile_once()
        signals = msgspec.json.decode(
            await conn.fetchval("SELECT signals FROM ai_model_autoscaling WHERE model_id = $1", mid)
        )
        assert signals["expected_start_s"] == pytest.approx(40.0, abs=1.0)  # the median
    finally:
        await conn.close()
