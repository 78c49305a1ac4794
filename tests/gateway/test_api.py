"""The gateway end to end with the openai SDK and every kind of bad input.

One in-process gateway (auth on: keys from PostgreSQL, key tables from Redis) in front of a
simulator serving ``m1``; ``m2`` is routed to the same simulator but the test tenant may not use
it. Every bad input must get a clear 4xx and leave no handler task behind.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import msgspec
import openai
import pytest
import redis.asyncio as aioredis

from gateway.worker import Worker
from hpcgate.schemas import KeyTable, RedisNames
from tests.gateway.conftest import (
    SECRET,
    add_tenant,
    handler_tasks,
    post,
    raw_exchange,
    read_response,
    running_gateway,
)
from tests.support.procs import wait_until
from tests.support.sim import SimProcess

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'


@pytest.fixture(scope="module")
async def tenant(pg_dsn: str) -> tuple[int, str]:
    return await add_tenant(pg_dsn, "api-tenant", allowed=["m1"])


@pytest.fixture(scope="module")
async def gw(sim_a: SimProcess, pg_dsn: str, redis_url: str, redis_prefix: str,
             tenant: tuple[int, str]) -> AsyncIterator[Worker]:
    async with running_gateway(
        static_endpoints=(f"m1={sim_a.url}", f"m2={sim_a.url}"), database_url=pg_dsn, redis_url=redis_url,
        redis_prefix=f"{redis_prefix}api:", key_hash_secret=SECRET, request_read_timeout_s=0.5,
        max_body_bytes=64 * 1024, max_header_count=50, usage_flush_s=0.2, access_log=True,
    ) as worker:
        yield worker


def base_url(gw: Worker) -> str:
    return f"http://127.0.0.1:{gw.port}/v1"


async def test_openai_async_sdk_streaming_and_not(gw: Worker, tenant: tuple[int, str], pg_dsn: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(gw), api_key=tenant[1], max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 5
        stream = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=6, stream=True)
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        assert all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is stripped
        stream = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True})
        usage = [c.usage async for c in stream if c.usage is not None]
        assert len(usage) == 1 and usage[0].completion_tokens == 3  # the client's own request is honoured
        comp = await client.completions.create(model="m1", prompt="once upon", max_tokens=3)
        assert comp.choices[0].text
        emb = await client.embeddings.create(model="m1", input=["a", "b"])
        assert len(emb.data) == 2
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m1"]  # m2 exists but this key may not use it
    finally:
        await client.close()
    # usage reaches PostgreSQL in batches: 5 + 6 + 3 + 3 completion tokens over 5 requests
    import asyncpg

    async def usage_written() -> bool:
        conn = await asyncpg.connect(pg_dsn)
        try:
            row = await conn.fetchrow("SELECT sum(requests) r, sum(completion_tokens) c FROM usage_records"
                                      " WHERE tenant_id = $1", tenant[0])
        finally:
            await conn.close()
        return row is not None and row["r"] == 5 and row["c"] == 17

    await wait_until(usage_written, 10, "usage rows in PostgreSQL")


async def test_openai_sync_sdk_streaming_and_not(gw: Worker, tenant: tuple[int, str]) -> None:
    def use_sync_client() -> tuple[str, str]:
        with openai.OpenAI(base_url=base_url(gw), api_key=tenant[1], max_retries=0) as client:
            chat = client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
            stream = client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            return chat.choices[0].message.content or "", text

    full, streamed = await asyncio.to_thread(use_sync_client)  # the gateway runs on this loop
    assert full and streamed


async def test_sdk_errors_are_openai_shaped(gw: Worker, tenant: tuple[int, str]) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(gw), api_key=tenant[1], max_retries=0)
    try:
        with pytest.raises(openai.NotFoundError) as nf:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="m2", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()
    bad = openai.AsyncOpenAI(base_url=base_url(gw), api_key="hpg_wrong", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}])
    finally:
        await bad.close()


def _key(tenant: tuple[int, str]) -> str:
    return tenant[1]


BAD_INPUTS = [
    # (name, request bytes (None key placeholder "KEY"), expected status, expected error code or None)
    ("malformed json", post("/v1/chat/completions", b'{"model": "m1", "messages": [', "KEY"), 400,
     "invalid_json"),
    ("array body", post("/v1/chat/completions", b"[1, 2]", "KEY"), 400, "invalid_body"),
    ("missing model", post("/v1/chat/completions", b'{"messages": []}', "KEY"), 400, "invalid_body"),
    ("model not a string", post("/v1/chat/completions", b'{"model": 1, "messages": []}', "KEY"), 400,
     "invalid_body"),
    ("missing messages", post("/v1/chat/completions", b'{"model": "m1"}', "KEY"), 400, "invalid_body"),
    ("messages not a list", post("/v1/chat/completions", b'{"model": "m1", "messages": {}}', "KEY"), 400,
     "invalid_body"),
    ("empty body", post("/v1/chat/completions", b"", "KEY"), 400, "invalid_body"),
    ("unknown model", post("/v1/chat/completions", b'{"model": "zz", "messages": []}', "KEY"), 404,
     "model_not_found"),
    ("model not allowed", post("/v1/chat/completions", b'{"model": "m2", "messages": []}', "KEY"), 403,
     "model_not_allowed"),
    ("wrong content type", post("/v1/chat/completions", CHAT, "KEY", ctype="text/plain"), 415,
     "unsupported_media_type"),
    ("missing key", post("/v1/chat/completions", CHAT), 401, "missing_api_key"),
    ("invalid key", post("/v1/chat/completions", CHAT, "hpg_not_a_key"), 401, "invalid_api_key"),
    ("body over limit", post("/v1/chat/completions", b"x" * (64 * 1024 + 1), "KEY"), 413, None),
    ("header flood", b"POST /v1/chat/completions HTTP/1.1\r\n"
     + b"".join(b"X-F-%d: v\r\n" % i for i in range(60)) + b"\r\n", 431, None),
    ("unknown path", b"GET /v2/nothing HTTP/1.1\r\n\r\n", 404, "unknown_url"),
    ("wrong method", b"GET /v1/chat/completions HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ("garbage", b"\x16\x03\x01\x02\x00 not http\r\n\r\n", 400, None),
]


@pytest.mark.parametrize(("name", "data", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_a_clear_4xx(gw: Worker, tenant: tuple[int, str], name: str, data: bytes, *,
                                          status: int, code: str | None) -> None:
    before = set(asyncio.all_tasks())
    reply = await raw_exchange(gw.port, data.replace(b"Bearer KEY", f"Bearer {tenant[1]}".encode()))
    assert reply.status == status, reply.body
    err = reply.json()["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code
    await wait_until(lambda: handler_tasks(gw) == 0, 5, "handler tasks to end")
    leftover = {t for t in asyncio.all_tasks() - before
                if not t.done() and "scrape" not in repr(t.get_coro())}
    leftover.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
    assert not leftover, leftover


async def test_slowloris_times_out_with_408(gw: Worker) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nX-Slow: ")  # ... and never finish
        reply = await asyncio.wait_for(read_response(reader), 5)
        assert reply.status == 408
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is closed
    finally:
        writer.close()
    await wait_until(lambda: handler_tasks(gw) == 0, 5, "handler tasks to end")


async def test_access_log_line_without_the_key(gw: Worker, tenant: tuple[int, str],
                                               capfd: pytest.CaptureFixture[str]) -> None:
    assert gw.gateway.access_log is not None
    gw.gateway.access_log.flush()
    capfd.readouterr()
    data = post("/v1/chat/completions", CHAT, tenant[1])
    data = data.replace(b"Host: t", b"Host: t\r\nX-Request-Id: req-42")
    assert (await raw_exchange(gw.port, data)).status == 200
    gw.gateway.access_log.flush()
    lines = [msgspec.json.decode(ln) for ln in capfd.readouterr().err.splitlines() if '"access"' in ln]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "req-42" and line["tenant"] == "api-tenant" and line["model"] == "m1"
    assert line["status"] == 200 and line["backend"] and line["ttft_ms"] > 0 and line["duration_ms"] > 0
    assert tenant[1] not in str(line)


async def test_health_ready_metrics(gw: Worker) -> None:
    assert (await raw_exchange(gw.port, b"GET /health HTTP/1.1\r\n\r\n")).status == 200
    assert (await raw_exchange(gw.port, b"GET /ready HTTP/1.1\r\n\r\n")).status == 200
    metrics = (await raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\n\r\n")).body.decode()
    assert 'hpcgate_gateway_requests_total{model="m1",status="200",worker="0"}' in metrics
    assert "hpcgate_gateway_ttft_seconds_bucket" in metrics
    assert "hpcgate_gateway_endpoint_inflight" in metrics


async def test_revoked_key_stops_working_within_a_second(gw: Worker, pg_dsn: str, redis_url: str,
                                                         redis_prefix: str) -> None:
    _, key = await add_tenant(pg_dsn, "revoked-tenant")
    await gw._load_keys_once()  # the key was created after start: the periodic resync would find it
    assert (await raw_exchange(gw.port, post("/v1/chat/completions", CHAT, key))).status == 200
    # the control plane revokes it and publishes a new key table without it
    held = gw.gateway.auth.index.version
    table = KeyTable(version=held + 1000, generated_at=time.time(), tenants=(), keys=())
    names = RedisNames(f"{redis_prefix}api:")
    client = aioredis.from_url(redis_url)
    try:
        await client.set(names.key_table, msgspec.json.encode(table))
        await client.publish(names.key_table_channel, str(table.version))
    finally:
        await client.aclose()
    start = time.monotonic()

    async def rejected() -> bool:
        reply = await raw_exchange(gw.port, post("/v1/chat/completions", CHAT, key))
        return reply.status == 401

    await wait_until(rejected, 1.0, "the revoked key to be rejected")
    assert time.monotonic() - start < 1.0


async def test_connection_limit_answers_503_and_closes(sim_a: SimProcess) -> None:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True,
                               limit_concurrency=1) as gw:
        _, holder = await asyncio.open_connection("127.0.0.1", gw.port)  # takes the only slot
        try:
            await wait_until(lambda: len(gw.server.connections) == 1, 5, "the first connection")
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            reply = await asyncio.wait_for(read_response(reader), 5)
            assert reply.status == 503 and reply.headers["retry-after"] == "1"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
            writer.close()
        finally:
            holder.close()


async def test_a_rejected_client_still_sending_its_body_reads_the_answer(gw: Worker,
                                                                        tenant: tuple[int, str]) -> None:
    """Lingering close: a 413 decided from the head, while the client keeps sending the body it
    announced, is still read by the client (an immediate close would answer its bytes with a
    reset that destroys the 413 in its receive buffer)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        head = post("/v1/chat/completions", b"", tenant[1]).replace(b"Length: 0", b"Length: 1000000")
        await loop.sock_sendall(sock, head)
        chunk = b"x" * 65536
        for _ in range(15):  # ~1 MB: the whole body it announced, sent without reading anything
            await asyncio.wait_for(loop.sock_sendall(sock, chunk), 10)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
            got += chunk
    assert got.startswith(b"HTTP/1.1 413 "), got[:200]
    assert b'"request body too large' in got
