"""Tenant limits held across gateways: two gateways, one Redis, leases (and Redis cut).

Each gateway here is a full gateway worker with its own limiter and lease holder id; they share
only Redis (leases, key table) and PostgreSQL (keys), as two replicas do. The last test runs
two ``hpcgate gateway`` processes with two workers each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import asyncpg
import msgspec
import redis.asyncio as aioredis

from bench.procs import start_dynamic_gateway, stop
from gateway.worker import Worker
from hpcgate.schemas import EndpointEntry, EndpointTable, ModelEntry, ModelState, RedisNames
from tests.gateway.conftest import SECRET, add_tenant, post, raw_exchange, running_gateway
from tests.gateway.test_admission import LONG, SHORT
from tests.support.procs import wait_until
from tests.support.sim import SimProcess
from tests.support.tcp_proxy import TcpProxy

LEASED = 'hpcgate_gateway_tenant_limits_leased{worker="0"}'


@asynccontextmanager
async def gateway(sim: SimProcess, dsn: str, redis_url: str, prefix: str,
                  **extra: object) -> AsyncIterator[Worker]:
    async with running_gateway(static_endpoints=(f"m1={sim.url}",), database_url=dsn, redis_url=redis_url,
                               redis_prefix=prefix, key_hash_secret=SECRET, lease_interval_s=0.1,
                               **extra) as gw:
        yield gw


async def code_of(gw: Worker, key: str, body: bytes = SHORT) -> str:
    reply = await raw_exchange(gw.port, post("/v1/chat/completions", body, key))
    return "ok" if reply.status == 200 else reply.json()["error"]["code"]


async def open_long(gw: Worker, key: str) -> asyncio.StreamWriter | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(post("/v1/chat/completions", LONG, key))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if head.startswith(b"HTTP/1.1 200"):
        return writer
    writer.close()
    return None


async def test_concurrency_limit_holds_across_two_gateways(sim_a: SimProcess, pg_dsn: str, redis_url: str,
                                                           redis_prefix: str) -> None:
    _, key = await add_tenant(pg_dsn, "one-in-the-cluster", max_concurrent=1)
    prefix = f"{redis_prefix}conc2:"
    async with gateway(sim_a, pg_dsn, redis_url, prefix) as a, gateway(sim_a, pg_dsn, redis_url, prefix) as b:
        stream: list[asyncio.StreamWriter] = []

        async def opened() -> bool:
            w = await open_long(a, key)
            if w is not None:
                stream.append(w)
            return w is not None

        await wait_until(opened, 10, "a lease of the tenant's slot on gateway A")
        try:
            # B gets no slot while A's stream holds the only one (one request in the cluster).
            await wait_until(lambda: _is(b, key, "concurrency_limit_exceeded"), 10, "B to be refused")
            for _ in range(3):
                assert await code_of(b, key) == "concurrency_limit_exceeded"
                assert await code_of(a, key) == "concurrency_limit_exceeded"
        finally:
            stream[0].transport.abort()
        await wait_until(lambda: _is(b, key, "ok"), 10, "the slot to move to B")


async def test_tpm_budget_is_shared_by_two_gateways(sim_a: SimProcess, pg_dsn: str, redis_url: str,
                                                    redis_prefix: str) -> None:
    tpm = 600
    _, key = await add_tenant(pg_dsn, "shared-tpm", tpm=tpm)
    prefix = f"{redis_prefix}tpm2:"
    # ~110 tokens reserved and used per request (ignore_eos: the engine writes all 100)
    body = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":100,"ignore_eos":true}'
    async with gateway(sim_a, pg_dsn, redis_url, prefix) as a, gateway(sim_a, pg_dsn, redis_url, prefix) as b:
        for gw in (a, b):  # each sees the tenant once (a provisional share), then leases
            assert await code_of(gw, key, body) == "ok"
        for _ in range(3):
            for gw in (a, b):
                assert gw.leases is not None
                gw.leases.synced.clear()
                await asyncio.wait_for(gw.leases.synced.wait(), 5)
        admitted = 0
        for i in range(20):  # alternating between the gateways, far more than the limit allows
            code = await code_of((a, b)[i % 2], key, body)
            assert code in ("ok", "rate_limit_exceeded")
            admitted += code == "ok"
        # What is left of one limit (600 - 2 x 110, plus ~10 tokens a second of refill) fits 3 or 4
        # more; a limit per gateway would have admitted about 8.
        assert 1 <= admitted <= 5
        assert await code_of(a, key, body) == "rate_limit_exceeded"
        assert await code_of(b, key, body) == "rate_limit_exceeded"


async def test_redis_cut_keeps_the_lease_then_falls_back(sim_a: SimProcess, pg_dsn: str, redis_url: str,
                                                         redis_prefix: str) -> None:
    _, key = await add_tenant(pg_dsn, "redis-goes-away", max_concurrent=2)
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    async with TcpProxy(host, int(port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with gateway(sim_a, pg_dsn, url, f"{redis_prefix}cut:", lease_hold_s=0.5) as gw:
            leases = gw.leases
            assert leases is not None
            await wait_until(lambda: _is(gw, key, "ok"), 10, "an admission")
            states = gw.gateway.tenants.states
            await wait_until(lambda: states and all(s.leased for s in states.values()), 10, "a lease")
            await proxy.cut()
            assert await code_of(gw, key) == "ok"  # the lease is kept while Redis is away
            lim = gw.gateway.tenants
            await wait_until(lambda: not lim.leasing and not any(s.leased for s in states.values()), 10,
                             "the local fallback")
            assert await code_of(gw, key) == "ok"  # a local share (the whole limit: one holder seen)
            assert f"{LEASED} 0.0" in gw.gateway.metrics.render().decode()
            await proxy.restore()
            leases.synced.clear()
            await asyncio.wait_for(leases.synced.wait(), 10)
            assert await code_of(gw, key) == "ok"
            assert f"{LEASED} 1.0" in gw.gateway.metrics.render().decode()


async def _is(gw: Worker, key: str, want: str, body: bytes = SHORT) -> bool:
    return await code_of(gw, key, body) == want



async def test_per_model_limit_and_monthly_quota(sim_a: SimProcess, pg_dsn: str, redis_url: str,
                                                 redis_prefix: str) -> None:
    tid, key = await add_tenant(pg_dsn, "model-capped")
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            """UPDATE identity_tenants SET model_limits = '{"m1": {"max_concurrent_requests": 1}}',
                      monthly_token_quota = 300 WHERE tenant_id = $1""", tid)
        await conn.execute(  # 250 of the 300 used this month already (by any gateway)
            """INSERT INTO usage_records (tenant_id, model, bucket_start, requests, prompt_tokens,
                                         completion_tokens) VALUES ($1, 'm1', now(), 1, 50, 200)""", tid)
    finally:
        await conn.close()
    small = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
    async with gateway(sim_a, pg_dsn, redis_url, f"{redis_prefix}model:") as gw:
        big = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":100}'
        reply = await raw_exchange(gw.port, post("/v1/chat/completions", big, key))  # over the 50 left
        assert reply.status == 429 and reply.json()["error"]["code"] == "insufficient_quota"
        assert "tokens left" in reply.json()["error"]["message"]
        await wait_until(lambda: _is(gw, key, "ok", small), 10, "a small request within the quota")
        # The model's own limit: one request at a time on m1 (the tenant has no limit of its own).
        await conn_limit_check(gw, key)


async def conn_limit_check(gw: Worker, key: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    body = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":30,"stream":true}'
    writer.write(post("/v1/chat/completions", body, key))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    try:
        assert head.startswith(b"HTTP/1.1 200"), head
        small = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
        reply = await raw_exchange(gw.port, post("/v1/chat/completions", small, key))
        assert reply.status == 429 and reply.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert "on model 'm1'" in reply.json()["error"]["message"]
    finally:
        writer.transport.abort()


async def test_one_slot_for_two_gateway_processes_of_two_workers(sim_a: SimProcess, pg_dsn: str,
                                                                 redis_url: str, redis_prefix: str) -> None:
    """Four holders (two ``hpcgate gateway`` processes with two workers each) and a tenant limited
    to one request at a time: while one stream runs, every fresh connection to either process,
    whichever worker takes it, is refused; once it ends, another process gets the slot."""
    _, key = await add_tenant(pg_dsn, "one-for-four-workers", max_concurrent=1)
    prefix = f"{redis_prefix}procs:"
    names = RedisNames(prefix)
    port = int(sim_a.url.rsplit(":", 1)[1])
    table = EndpointTable(version=1, generated_at=time.time(),
                          models=(ModelEntry(name="m1", state=ModelState.READY),),
                          endpoints=(EndpointEntry(endpoint_id=1, model="m1", url=sim_a.url, node="127.0.0.1",
                                                   port=port, endpoint_job_id=1, ready=True),))
    client = aioredis.from_url(redis_url)
    try:
        await client.set(names.endpoint_table, msgspec.json.encode(table))
    finally:
        await client.aclose()
    env = {"HPCGATE_REDIS_URL": redis_url, "HPCGATE_REDIS_PREFIX": prefix, "HPCGATE_DATABASE_URL": pg_dsn,
           "HPCGATE_KEY_HASH_SECRET": SECRET, "HPCGATE_LOG_LEVEL": "warning",
           "HPCGATE_GATEWAY_LEASE_INTERVAL_S": "0.1"}
    async with AsyncExitStack() as exits:
        gateways = []
        for _ in range(2):
            child = await start_dynamic_gateway(env, workers=2)
            exits.push_async_callback(stop, child)
            gateways.append(child.port)
        one, two = gateways
        holder: list[asyncio.StreamWriter] = []

        async def opened() -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", one)
            writer.write(post("/v1/chat/completions", LONG, key))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if head.startswith(b"HTTP/1.1 200"):
                holder.append(writer)
                return True
            writer.close()
            return False

        await wait_until(opened, 20, "the tenant's one slot on the first gateway")
        try:
            async def all_refused() -> bool:
                for p in (one, two, two):
                    for _ in range(4):  # fresh connections: either worker of the process
                        reply = await raw_exchange(p, post("/v1/chat/completions", SHORT, key))
                        if reply.status != 429:
                            return False
                return True

            await wait_until(all_refused, 15, "every worker of both gateways to refuse")
            assert await all_refused()
        finally:
            holder[0].transport.abort()

        async def admitted() -> bool:
            return (await raw_exchange(two, post("/v1/chat/completions", SHORT, key))).status == 200

        await wait_until(admitted, 15, "the slot to move to the second gateway")
