"""Admission: tenant limits (429), saturated models (FIFO wait, then 503), models with no instance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from gateway.worker import Worker
from hpcgate.schemas import EndpointTable, ModelEntry, ModelState, RedisNames
from tests.gateway.conftest import SECRET, add_tenant, post, raw_exchange, running_gateway
from tests.support.procs import wait_until
from tests.support.sim import SimProcess

LONG = (b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":20000,'
        b'"ignore_eos":true,"stream":true}')
SHORT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


async def open_stream(port: int, key: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/v1/chat/completions", LONG, key))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def test_tenant_concurrency_limit_gives_429(sim_a: SimProcess, pg_dsn: str) -> None:
    _, key = await add_tenant(pg_dsn, "one-at-a-time", max_concurrent=1)
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), database_url=pg_dsn,
                               key_hash_secret=SECRET) as gw:
        _, writer = await open_stream(gw.port, key)
        try:
            reply = await raw_exchange(gw.port, post("/v1/chat/completions", SHORT, key))
            assert reply.status == 429 and reply.headers["retry-after"] == "1"
            assert reply.json()["error"]["code"] == "concurrency_limit_exceeded"
        finally:
            writer.transport.abort()
        await wait_until(lambda: _status(gw, key, 200), 5, "the slot to be released")


async def _status(gw: Worker, key: str | None, want: int) -> bool:
    return (await raw_exchange(gw.port, post("/v1/chat/completions", SHORT, key))).status == want


async def test_saturated_model_queues_fifo_then_503(sim_a: SimProcess) -> None:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True,
                               endpoint_max_inflight=1, queue_max=1, queue_timeout_s=30) as gw:
        _, holder = await open_stream(gw.port)
        queued = raw_exchange(gw.port, post("/v1/chat/completions", SHORT), timeout=30)
        waiting = asyncio.ensure_future(queued)
        await wait_until(lambda: gw.gateway.queues.length("m1") == 1, 5, "the second request to queue")
        full = await raw_exchange(gw.port, post("/v1/chat/completions", SHORT))
        assert full.status == 503 and full.json()["error"]["code"] == "model_saturated"
        assert "retry-after" in full.headers
        holder.transport.abort()  # the running request ends: the queued one goes next
        assert (await waiting).status == 200
        assert gw.gateway.queues.length("m1") == 0


async def test_queue_wait_times_out_with_503(sim_a: SimProcess) -> None:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True,
                               endpoint_max_inflight=1, queue_timeout_s=0.3) as gw:
        _, holder = await open_stream(gw.port)
        try:
            reply = await raw_exchange(gw.port, post("/v1/chat/completions", SHORT))
            assert reply.status == 503 and "stayed saturated" in reply.json()["error"]["message"]
        finally:
            holder.transport.abort()


@pytest.fixture
async def dynamic_gw(redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[Worker, RedisNames]]:
    prefix = f"{redis_prefix}adm:"
    async with running_gateway(redis_url=redis_url, redis_prefix=prefix, no_auth=True) as gw:
        yield gw, RedisNames(prefix)


async def test_model_without_instance_is_503_and_not_ready_before_a_table(
        dynamic_gw: tuple[Worker, RedisNames], redis_url: str) -> None:
    gw, names = dynamic_gw
    assert (await raw_exchange(gw.port, b"GET /ready HTTP/1.1\r\n\r\n")).status == 503
    table = EndpointTable(version=7, generated_at=time.time(), models=(
        ModelEntry(name="cold", state=ModelState.STARTING),
        ModelEntry(name="off", state=ModelState.STOPPED, reason="scaled to zero"),
        ModelEntry(name="broken", state=ModelState.FAILED, reason="slurm_resources.time: malformed"),
    ))
    client = aioredis.from_url(redis_url)
    try:
        await client.set(names.endpoint_table, msgspec.json.encode(table))
        await client.publish(names.endpoint_table_channel, b"7")
    finally:
        await client.aclose()
    await wait_until(lambda: gw.gateway.table.version == 7, 5, "the table")
    assert (await raw_exchange(gw.port, b"GET /ready HTTP/1.1\r\n\r\n")).status == 200
    cold = await raw_exchange(gw.port, post("/v1/chat/completions", SHORT.replace(b'"m1"', b'"cold"')))
    assert cold.status == 503 and cold.headers["retry-after"] == "10"
    assert cold.json()["error"]["code"] == "model_starting"
    # nothing will start these: no Retry-After (an SDK would wait and retry for nothing), and why
    off = await raw_exchange(gw.port, post("/v1/chat/completions", SHORT.replace(b'"m1"', b'"off"')))
    assert off.status == 503 and "retry-after" not in off.headers
    assert off.json()["error"]["code"] == "model_stopped"
    assert off.json()["error"]["message"].startswith("model 'off' is stopped: scaled to zero")
    broken = await raw_exchange(gw.port, post("/v1/chat/completions", SHORT.replace(b'"m1"', b'"broken"')))
    assert broken.status == 503 and "retry-after" not in broken.headers
    assert broken.json()["error"]["code"] == "model_failed"
    assert "failed: slurm_resources.time: malformed" in broken.json()["error"]["message"]
    models = (await raw_exchange(gw.port, b"GET /v1/models HTTP/1.1\r\n\r\n")).json()
    assert {(m["id"], m["state"]) for m in models["data"]} == {
        ("cold", "starting"), ("off", "stopped"), ("broken", "failed")}


