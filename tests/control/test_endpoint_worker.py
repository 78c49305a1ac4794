"""The Endpoint Worker end to end: register -> probe -> ready -> published -> a subscriber sees it.

Real PostgreSQL and Redis, the real ``hpcgate control api`` and ``hpcgate control health``
subprocesses, and ``hpcgate sim`` as the endpoint. The subscriber follows the gateway's
protocol: it waits for a version on the pub/sub channel, then GETs the snapshot.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from hpcgate.schemas import EndpointTable, KeyTable, hash_api_key
from tests.control.conftest import Stack
from tests.control.daemons import KEY_SECRET, Daemon, start_api, start_health
from tests.control.subscriber import Subscriber
from tests.support.procs import wait_until
from tests.support.sim import SimProcess, sim_process


def endpoints(stack: Stack) -> AbstractAsyncContextManager[Subscriber[EndpointTable]]:
    return Subscriber(stack, EndpointTable)


def by_id(table: EndpointTable, endpoint_id: int) -> Any:
    return next((e for e in table.endpoints if e.endpoint_id == endpoint_id), None)


@pytest.fixture(scope="module")
async def daemons(stack: Stack) -> AsyncIterator[dict[str, Daemon]]:
    api = await start_api(stack.env, stack.tmp)
    stack.api_url = f"http://127.0.0.1:{api.port}"
    health = await start_health(stack.env, stack.tmp)
    running = {"api": api, "health": health}
    yield running
    for daemon in running.values():
        await daemon.stop()


async def register_and_serve(stack: Stack, model: str, **sim_env: str) -> tuple[int, int, Any]:
    model_id = (await stack.sql("SELECT model_id FROM ai_model_configurations WHERE name = $1", model))[0][0]
    job_id, token = await stack.add_job(model_id)
    status, body = await stack.register(job_id, token, model, bearer="sim-secret")
    assert status == 200, body
    return job_id, body["endpoint_id"], body["port"]


def serve(port: int, model: str) -> AbstractAsyncContextManager[SimProcess]:
    return sim_process("--port", str(port), "--model", model, "--api-key", "sim-secret")


async def job_state(stack: Stack, job_id: int) -> tuple[str, str | None]:
    (row,) = await stack.sql(
        "SELECT state, state_reason FROM ai_model_endpoint_jobs WHERE endpoint_job_id = $1", job_id
    )
    return row["state"], row["state_reason"]


async def test_register_probe_ready_publish(stack: Stack, daemons: dict[str, Daemon]) -> None:
    await stack.add_model("ew/ready", aliases=("ready-alias",))
    async with endpoints(stack) as sub:
        job_id, endpoint_id, port = await register_and_serve(stack, "ew/ready")
        async with serve(port, "ew/ready"):
            table = await sub.until(lambda t: by_id(t, endpoint_id) is not None)
            entry = by_id(table, endpoint_id)
            assert entry.ready and not entry.draining
            assert entry.url == f"http://127.0.0.1:{port}" and entry.bearer_token == "sim-secret"
            assert entry.model == "ew/ready" and entry.endpoint_job_id == job_id
            model = next(m for m in table.models if m.name == "ew/ready")
            assert model.state == "ready" and model.aliases == ("ready-alias",)
            assert await job_state(stack, job_id) == ("ready", None)

            # Prometheus HTTP SD lists it, with labels
            status, groups = await stack.admin("GET", "/sd/vllm")
            assert status == 200
            group = next(g for g in groups if g["labels"]["endpoint_id"] == str(endpoint_id))
            assert group["targets"] == [f"127.0.0.1:{port}"]
            assert group["labels"]["model"] == "ew/ready"
            assert group["labels"]["endpoint_job_id"] == str(job_id)

            # an admin drain reaches the table as draining=true
            status, _ = await stack.admin("POST", f"/admin/endpoints/{endpoint_id}/drain")
            assert status == 200
            table = await sub.until(
                lambda t: by_id(t, endpoint_id) is not None and by_id(t, endpoint_id).draining
            )
            assert next(m for m in table.models if m.name == "ew/ready").state == "starting"


async def test_a_job_that_dies_is_removed(stack: Stack, daemons: dict[str, Daemon]) -> None:
    await stack.add_model("ew/dies")
    async with endpoints(stack) as sub:
        job_id, endpoint_id, port = await register_and_serve(stack, "ew/dies")
        async with serve(port, "ew/dies") as sim:
            await sub.until(lambda t: by_id(t, endpoint_id) is not None and by_id(t, endpoint_id).ready)
            sim.proc.kill()
            await sim.proc.wait()
        # first unroutable (ready=false), then removed after dead_after failed probes
        await sub.until(lambda t: by_id(t, endpoint_id) is not None and not by_id(t, endpoint_id).ready)
        table = await sub.until(lambda t: by_id(t, endpoint_id) is None)
        assert all(e.endpoint_id != endpoint_id for e in table.endpoints)
    state, reason = await job_state(stack, job_id)
    assert state == "failed" and reason is not None and "unresponsive" in reason
    assert not await stack.sql("SELECT 1 FROM ai_model_endpoints WHERE endpoint_id = $1", endpoint_id)


async def test_a_job_the_job_worker_ended_is_removed(stack: Stack, daemons: dict[str, Daemon]) -> None:
    await stack.add_model("ew/ended")
    async with endpoints(stack) as sub:
        job_id, endpoint_id, port = await register_and_serve(stack, "ew/ended")
        async with serve(port, "ew/ended"):
            await sub.until(lambda t: by_id(t, endpoint_id) is not None)
            await stack.sql(
                "UPDATE ai_model_endpoint_jobs SET state = 'ended' WHERE endpoint_job_id = $1", job_id
            )
            await sub.until(lambda t: by_id(t, endpoint_id) is None)
    assert await job_state(stack, job_id) == ("ended", None)
    await wait_until(lambda: _gone(stack, endpoint_id), 10, "endpoint row deleted")


async def _gone(stack: Stack, endpoint_id: int) -> bool:
    return not await stack.sql("SELECT 1 FROM ai_model_endpoints WHERE endpoint_id = $1", endpoint_id)


async def test_startup_timeout_fails_the_job(stack: Stack, daemons: dict[str, Daemon]) -> None:
    await stack.add_model("ew/slow", startup_timeout_s=1)
    job_id, endpoint_id, _port = await register_and_serve(stack, "ew/slow")  # nothing ever listens

    async def failed() -> bool:
        return (await job_state(stack, job_id))[0] == "failed"

    await wait_until(failed, 15, "job failed by the startup timeout")
    _, reason = await job_state(stack, job_id)
    assert reason is not None and "startup_timeout_s=1" in reason
    assert await _gone(stack, endpoint_id)


async def test_key_revocation_reaches_a_subscriber_within_one_second(
    stack: Stack, daemons: dict[str, Daemon]
) -> None:
    status, _ = await stack.admin("POST", "/admin/tenants", {"name": "revoke-me"})
    assert status == 201
    status, created = await stack.admin("POST", "/admin/tenants/revoke-me/keys", {"description": "t"})
    assert status == 201
    key_hash = hash_api_key(KEY_SECRET.encode(), created["key"]).hex()

    async with Subscriber(stack, KeyTable) as sub:
        table = await sub.until(lambda t: any(k.key_hash == key_hash for k in t.keys))
        tenant = next(t for t in table.tenants if t.name == "revoke-me")
        assert next(k for k in table.keys if k.key_hash == key_hash).tenant_id == tenant.tenant_id

        status, _ = await stack.admin("POST", f"/admin/keys/{created['api_key']['key_id']}/revoke")
        assert status == 200
        revoked_at = time.monotonic()
        await sub.until(lambda t: all(k.key_hash != key_hash for k in t.keys), timeout=1.0)
        assert time.monotonic() - revoked_at < 1.0

        # disabling a tenant removes the tenant and all its keys the same way
        status, second = await stack.admin("POST", "/admin/tenants/revoke-me/keys", {})
        other = hash_api_key(KEY_SECRET.encode(), second["key"]).hex()
        await sub.until(lambda t: any(k.key_hash == other for k in t.keys))
        await stack.admin("PATCH", "/admin/tenants/revoke-me", {"enabled": False})
        await sub.until(
            lambda t: (
                all(k.key_hash != other for k in t.keys) and all(x.name != "revoke-me" for x in t.tenants)
            ),
            timeout=1.0,
        )


async def test_kill_9_of_the_worker_converges_without_duplicates(
    stack: Stack, daemons: dict[str, Daemon]
) -> None:
    await stack.add_model("ew/restart")
    async with endpoints(stack) as sub:
        _job_id, endpoint_id, port = await register_and_serve(stack, "ew/restart")
        async with serve(port, "ew/restart"):
            before = await sub.until(lambda t: by_id(t, endpoint_id) is not None)
            await daemons["health"].kill9()
            daemons["health"] = await start_health(stack.env, stack.tmp)
            after = await sub.until(
                lambda t: t.version > before.version and by_id(t, endpoint_id) is not None
            )
            ids = [e.endpoint_id for e in after.endpoints]
            assert len(ids) == len(set(ids))
            assert by_id(after, endpoint_id) == by_id(before, endpoint_id)
    rows = await stack.sql("SELECT count(*) AS n FROM ai_model_endpoints WHERE endpoint_id = $1", endpoint_id)
    assert rows[0]["n"] <= 1


async def test_a_second_worker_stands_by_and_takes_over_after_kill_9(
    stack: Stack, daemons: dict[str, Daemon]
) -> None:
    """Two replicas by mistake (or during a rolling update): one publishes, the other waits on
    the PostgreSQL advisory lock and takes over within a second of the first one's kill -9."""
    env = {**stack.env, "HPCGATE_HEALTH_STANDBY_POLL_S": "0.2"}
    second = await start_health(env, stack.tmp, standby=True)
    try:
        (standby,) = second.events("singleton_state")
        assert standby["old"] == "starting" and "hpcgate-control-health" in standby["holder"]
        async with endpoints(stack) as sub:
            before = await sub.until(lambda t: True)
            assert not second.events("health_worker_started")  # the standby publishes nothing
            await daemons["health"].kill9()
            killed_at = time.time()
            await wait_until(lambda: bool(second.events("health_worker_started")), 10, "takeover")
            await sub.until(lambda t: t.version > before.version)  # and versions keep growing
        active = [e for e in second.events("singleton_state") if e["new"] == "active"]
        assert len(active) == 1 and active[0]["old"] == "standby"
        assert active[0]["ts"] - killed_at < 1.0  # standby_poll_s 0.2, with room for a busy machine
    finally:
        daemons["health"] = second  # the module's worker from now on (stopped by the fixture)
