"""PostgreSQL and Redis "restarting" under the control daemons, and ``kill -9`` of the api.

The shared servers are never stopped (other test runs use them): each daemon reaches them
through a :class:`TcpProxy` the test cuts (every connection reset, new ones refused) and
restores. Meanwhile the test changes the database directly, so the daemons must catch up on
what they missed (the NOTIFY they could not hear) once the path is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hpcgate.schemas import KeyTable, hash_api_key
from tests.control.conftest import Stack
from tests.control.daemons import KEY_SECRET, Daemon, start_api, start_health
from tests.control.subscriber import Subscriber
from tests.support.procs import wait_until
from tests.support.tcp_proxy import TcpProxy


class Rig:
    def __init__(self, stack: Stack, pg: TcpProxy, redis: TcpProxy) -> None:
        self.stack = stack
        self.pg = pg
        self.redis = redis
        self.env = {
            **stack.env,
            "HPCGATE_DATABASE_URL": stack.dsn.replace(":5432/", f":{pg.port}/"),
            "HPCGATE_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
            "HPCGATE_API_DB_TIMEOUT_S": "2",
        }
        self.api: Daemon | None = None
        self.health: Daemon | None = None


@pytest.fixture(scope="module")
async def rig(stack: Stack) -> AsyncIterator[Rig]:
    assert ":5432/" in stack.dsn
    async with TcpProxy("127.0.0.1", 5432) as pg, TcpProxy("127.0.0.1", 6379) as redis:
        r = Rig(stack, pg, redis)
        r.api = await start_api(r.env, stack.tmp)
        stack.api_url = f"http://127.0.0.1:{r.api.port}"
        r.health = await start_health(r.env, stack.tmp)
        yield r
        for daemon in (r.api, r.health):
            if daemon is not None:
                await daemon.stop()


def outage_events(daemon: Daemon, dependency: str) -> tuple[int, int]:
    down = [e for e in daemon.events("dependency_unavailable") if e["dependency"] == dependency]
    up = [e for e in daemon.events("dependency_recovered") if e["dependency"] == dependency]
    return len(down), len(up)


async def new_key(stack: Stack, tenant: str) -> tuple[int, str]:
    status, created = await stack.admin("POST", f"/admin/tenants/{tenant}/keys", {})
    assert status == 201, created
    return created["api_key"]["key_id"], hash_api_key(KEY_SECRET.encode(), created["key"]).hex()


async def test_postgresql_outage_under_api_and_worker(rig: Rig) -> None:
    stack, api, health = rig.stack, rig.api, rig.health
    assert api is not None and health is not None
    assert (await stack.admin("POST", "/admin/tenants", {"name": "pg-outage"}))[0] == 201
    key_id, key_hash = await new_key(stack, "pg-outage")

    async with Subscriber(stack, KeyTable) as sub:
        await sub.until(lambda t: any(k.key_hash == key_hash for k in t.keys))
        await rig.pg.cut()

        # the api answers 503 with a reason (never hangs, never 500) while the database is away
        status, body = await stack.admin("GET", "/admin/tenants")
        assert status == 503 and body["error"] == "unavailable"
        # a change the daemons cannot hear about: made directly, its NOTIFY goes to nobody
        await stack.sql(
            "UPDATE identity_tenant_authentications SET revoked_at = now() WHERE authentication_id = $1",
            key_id,
        )
        await wait_until(lambda: outage_events(health, "postgresql")[0] >= 1, 15, "worker notices the outage")

        await rig.pg.restore()
        table = await sub.until(lambda t: all(k.key_hash != key_hash for k in t.keys), timeout=20)
        assert table.version > sub.versions[0]

    await wait_until(lambda: outage_events(health, "postgresql")[1] >= 1, 15, "worker logs the recovery")
    assert outage_events(health, "postgresql") == (1, 1)  # logged once, recovered once

    async def api_back() -> bool:
        return (await stack.admin("GET", "/admin/tenants"))[0] == 200

    await wait_until(api_back, 15, "api serves again")
    assert outage_events(api, "postgresql") == (1, 1)


async def test_redis_outage_under_the_worker(rig: Rig) -> None:
    stack, health = rig.stack, rig.health
    assert health is not None
    assert (await stack.admin("POST", "/admin/tenants", {"name": "redis-outage"}))[0] == 201

    async with Subscriber(stack, KeyTable) as sub:
        await rig.redis.cut()
        _, key_hash = await new_key(stack, "redis-outage")  # the api does not need Redis
        await wait_until(lambda: outage_events(health, "redis")[0] >= 1, 15, "worker notices Redis is gone")
        await rig.redis.restore()
        table = await sub.until(lambda t: any(k.key_hash == key_hash for k in t.keys), timeout=20)
        assert any(t.name == "redis-outage" for t in table.tenants)

    await wait_until(lambda: outage_events(health, "redis")[1] >= 1, 15, "worker logs the Redis recovery")
    assert outage_events(health, "redis") == (1, 1)


async def test_kill_9_of_the_api_during_registrations_converges(rig: Rig) -> None:
    stack = rig.stack
    assert rig.api is not None
    model_id = await stack.add_model("outage/kill9")
    jobs = [await stack.add_job(model_id) for _ in range(20)]

    async def attempt(job_id: int, token: str) -> tuple[int, object]:
        try:
            return await stack.register(job_id, token, "outage/kill9", node="kill9-node")
        except (OSError, IndexError, ValueError, TimeoutError):
            return 0, None  # the connection died with the api

    in_flight = [asyncio.create_task(attempt(j, t)) for j, t in jobs]
    await asyncio.sleep(0)  # let the requests start before the kill
    await rig.api.kill9()
    await asyncio.gather(*in_flight)

    rig.api = await start_api(rig.env, stack.tmp, port=rig.api.port)
    # every job retries its registration: the same claim gets the same answer, no duplicates
    results = await asyncio.gather(
        *(stack.register(j, t, "outage/kill9", node="kill9-node") for j, t in jobs)
    )
    assert all(status == 200 for status, _ in results), results
    assert len({body["port"] for _, body in results}) == 20
    rows = await stack.sql(
        """SELECT e.endpoint_job_id, count(*) AS n FROM ai_model_endpoints e
             JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
            WHERE j.model_id = $1 GROUP BY e.endpoint_job_id""",
        model_id,
    )
    assert len(rows) == 20 and all(r["n"] == 1 for r in rows)
    again = await asyncio.gather(*(stack.register(j, t, "outage/kill9", node="kill9-node") for j, t in jobs))
    assert again == results
