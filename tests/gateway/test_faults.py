"""Faults: dead and dying endpoints, disconnecting clients, Redis restarts, PostgreSQL outages."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import shutil
import socket
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import openai
import pytest
import redis.asyncio as aioredis

from gateway.http_server import HttpConnection
from gateway.relay import Exchange
from gateway.table_sync import RedisTableSync
from gateway.worker import Worker
from hpcgate.metrics_text import parse_engine_load
from hpcgate.schemas import EndpointEntry, EndpointTable, ModelEntry, ModelState, RedisNames
from tests.gateway.conftest import (
    SECRET,
    add_tenant,
    handler_tasks,
    post,
    raw_exchange,
    read_response,
    running_gateway,
)
from tests.gateway.cut_proxy import CuttableProxy
from tests.gateway.scripted import CHUNK, STREAM_HEAD, Script, one_chunk, scripted_upstream
from tests.support.procs import wait_until
from tests.support.services import ADMIN_DSN, REDIS_URL
from tests.support.sim import SimProcess, sim_process

pytestmark = pytest.mark.serial  # timing-sensitive: ./dev.sh test runs it after the parallel rest

SLOW = ("--model", "m1", "--profile", "gpu-s")  # ~19 tokens/s: streams that last long enough to cut
LONG_STREAM = (b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2000,'
               b'"ignore_eos":true,"stream":true}')
LONG_PLAIN = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2000,"ignore_eos":true}'


async def sim_metrics(sim: SimProcess) -> bytes:
    return (await raw_exchange(sim.port, b"GET /metrics HTTP/1.1\r\nHost: sim\r\n\r\n")).body


async def aborted(sim: SimProcess) -> float:
    text = (await sim_metrics(sim)).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def running(sim: SimProcess) -> float | None:
    return parse_engine_load(await sim_metrics(sim)).running


async def test_endpoint_dead_before_first_byte_is_retried_elsewhere(sim_a: SimProcess) -> None:
    # The dead endpoint refuses connections: a port bound but not listening (a stopped server's
    # port could be taken by another process before the test uses it, making it alive again).
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    # Every request must still succeed on the live one. Which endpoint a request tries first is
    # the balancer's (partly random) choice: send until the dead one has been tried, with a
    # retry budget that cannot run out, instead of a fixed count that may never pick it. No
    # scrape during the test: a failed scrape of the dead one would rank it behind the live one
    # for good (as it should), and on a slow machine it could come before any request tried it.
    async with running_gateway(static_endpoints=(f"m1={dead_url},{sim_a.url}",), no_auth=True,
                               eject_after_failures=1000, retry_budget_ratio=1.0,
                               scrape_interval_s=3600) as gw:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        metrics = ""
        try:
            for _ in range(60):
                r = await client.chat.completions.create(
                    model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=2)
                assert r.choices[0].message.content
                metrics = (await raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\n\r\n")).body.decode()
                if 'kind="connect"' in metrics:
                    break
        finally:
            await client.close()
        assert "hpcgate_gateway_retries_total{" in metrics and 'kind="connect"' in metrics
    dead.close()


BOTH_RELAYS = pytest.mark.parametrize("offload", [True, False], ids=["c-relay", "event-loop"])


def assert_relayed_by(gw: Worker, offload: bool, streams: int = 1) -> None:
    off = gw.gateway.offloader
    assert (off.started if off is not None else 0) == (streams if offload else 0)


@BOTH_RELAYS
async def test_endpoint_killed_mid_stream_ends_with_sse_error(offload: bool) -> None:
    async with sim_process(*SLOW) as sim, running_gateway(static_endpoints=(f"m1={sim.url}",),
                                                          no_auth=True, stream_offload=offload) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(post("/v1/chat/completions", LONG_STREAM))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readuntil(b"data: "), 10)  # the stream has started
            sim.proc.kill()  # the engine dies mid-stream
            rest = await asyncio.wait_for(reader.read(), 10)  # a clean end, never a hang
        finally:
            writer.close()
        assert b'data: {"error":' in rest and b'"code":"closed"' in rest
        assert rest.endswith(b"0\r\n\r\n")  # the chunked response is properly terminated
        assert_relayed_by(gw, offload)
        await wait_until(lambda: handler_tasks(gw) == 0, 5, "handler tasks to end")


async def test_openai_sdk_sees_mid_stream_failure_as_error() -> None:
    async with sim_process(*SLOW) as sim, running_gateway(static_endpoints=(f"m1={sim.url}",),
                                                          no_auth=True) as gw:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=2000, stream=True,
                extra_body={"ignore_eos": True})
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    if sim.proc.returncode is None:
                        sim.proc.kill()
        finally:
            await client.close()


@pytest.mark.parametrize(("streaming", "offload"), [(True, True), (True, False), (False, False)],
                         ids=["stream-c-relay", "stream-event-loop", "plain"])
async def test_client_disconnect_aborts_the_upstream_request(streaming: bool, offload: bool) -> None:
    async with sim_process(*SLOW) as sim, running_gateway(static_endpoints=(f"m1={sim.url}",),
                                                          no_auth=True, stream_offload=offload) as gw:
        before = await aborted(sim)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(post("/v1/chat/completions", LONG_STREAM if streaming else LONG_PLAIN))
        if streaming:
            await asyncio.wait_for(reader.readuntil(b"data: "), 10)
        else:
            await wait_until(lambda: running(sim), 10, "the engine to run the request")
        writer.transport.abort()  # the client goes away
        await wait_until(lambda: _gt(aborted(sim), before), 5, "the simulator to count an abort")
        assert await running(sim) == 0
        await wait_until(lambda: handler_tasks(gw) == 0, 5, "handler tasks to end")
        assert_relayed_by(gw, offload, 1 if streaming else 0)


async def _gt(value: object, than: float) -> bool:
    assert asyncio.iscoroutine(value)
    return bool(await value > than)


# -- Redis restarted ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis(port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def _publish(url: str, names: RedisNames, table: EndpointTable) -> None:
    client = aioredis.from_url(url)
    try:
        await client.set(names.endpoint_table, msgspec.json.encode(table))
        await client.publish(names.endpoint_table_channel, str(table.version))
    finally:
        await client.aclose()


async def _redis_up(url: str) -> bool:
    client = aioredis.from_url(url, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


def _table(version: int, sim: SimProcess, alias: str) -> EndpointTable:
    return EndpointTable(
        version=version, generated_at=time.time(),
        models=(ModelEntry(name="m1", aliases=(alias,), state=ModelState.READY),),
        endpoints=(EndpointEntry(endpoint_id=version, model="m1", url=sim.url, node=sim.host, port=sim.port,
                                 endpoint_job_id=version, ready=True),),
    )


def _chat(model: str) -> bytes:
    body = b'{"model":"%s","messages":[{"role":"user","content":"x"}],"max_tokens":2}' % model.encode()
    return post("/v1/chat/completions", body)


async def test_redis_restart_keeps_serving_and_picks_up_the_next_table(sim_a: SimProcess,
                                                                       sim_b: SimProcess) -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    names = RedisNames("faults:")
    with private_redis(port) as first:
        await wait_until(lambda: _redis_up(url), 10, "private redis")
        await _publish(url, names, _table(1, sim_a, "first"))
        async with running_gateway(redis_url=url, redis_prefix="faults:", no_auth=True,
                                   redis_backoff_max_s=0.3) as gw:
            await wait_until(lambda: gw.gateway.table.version == 1, 5, "table v1")
            assert (await raw_exchange(gw.port, _chat("m1"))).status == 200
            first.terminate()
            first.wait(10)
            assert gw.sync is not None
            sync = gw.sync
            await wait_until(lambda: not sync.connected.is_set(), 10, "the gateway to notice redis is gone")
            assert (await raw_exchange(gw.port, _chat("m1"))).status == 200  # the last table keeps serving
            with private_redis(port):
                await wait_until(lambda: _redis_up(url), 10, "private redis restarted")
                await _publish(url, names, _table(2, sim_b, "second"))  # (an empty redis: only v2 exists)
                await wait_until(lambda: gw.gateway.table.version == 2, 10, "table v2 after the restart")
                reply = await raw_exchange(gw.port, _chat("second"))  # an alias, resolved by the gateway
                assert reply.status == 200 and reply.json()["model"] == "m1"
                assert (await raw_exchange(gw.port, _chat("first"))).status == 404


# -- PostgreSQL stopped ---------------------------------------------------------------------------
@pytest.fixture
async def pg_proxy() -> AsyncIterator[CuttableProxy]:
    host_port = ADMIN_DSN.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = CuttableProxy(host, int(port or 5432))
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_postgres_down_known_keys_still_served(sim_a: SimProcess, pg_dsn: str,
                                                    pg_proxy: CuttableProxy) -> None:
    tenant_id, key = await add_tenant(pg_dsn, "pg-outage")
    dbname = pg_dsn.rsplit("/", 1)[1]
    via_proxy = f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/{dbname}"
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), database_url=via_proxy,
                               key_hash_secret=SECRET, key_resync_s=0.2, usage_flush_s=0.2) as gw:
        assert (await raw_exchange(gw.port, post("/v1/chat/completions", _body(), key))).status == 200
        pg_proxy.cut()  # PostgreSQL is unreachable from now on
        failures = gw.key_load_failures
        await wait_until(lambda: gw.key_load_failures > failures, 10, "a failed key resync")
        for _ in range(3):
            assert (await raw_exchange(gw.port, post("/v1/chat/completions", _body(), key))).status == 200
        assert gw.gateway.usage.pending > 0  # usage waits in memory while PostgreSQL is down
        pg_proxy.restore()
        await wait_until(lambda: gw.gateway.usage.pending == 0, 10, "usage written after the outage")
    import asyncpg

    conn = await asyncpg.connect(pg_dsn)
    try:
        total = await conn.fetchval("SELECT sum(requests) FROM usage_records WHERE tenant_id = $1", tenant_id)
        assert total == 4
    finally:
        await conn.close()


def _body() -> bytes:
    return b'{"model":"m1","messages":[{"role":"user","content":"x"}],"max_tokens":2}'



async def test_stalled_upstream_times_out_with_504() -> None:
    """An engine that accepts the request and never answers: 504 after the per-read timeout."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_gateway(static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True,
                                   upstream_read_timeout_s=0.5, max_retries=0) as gw:
            reply = await raw_exchange(gw.port, _chat("m1"), timeout=10)
            assert reply.status == 504 and reply.json()["error"]["code"] == "upstream_timeout"
            await wait_until(lambda: handler_tasks(gw) == 0, 5, "handler tasks to end")
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def small_window_stream(gw: Worker,
                              max_tokens: int) -> AsyncIterator[tuple[socket.socket, HttpConnection]]:
    """A client with 4 KiB kernel buffers (and the gateway's side of it too, so its window fills
    fast) that has sent a long stream request and read the response head; closed on exit."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        body = (b'{"model":"m1","messages":[{"role":"user","content":"x"}],"max_tokens":%d,'
                b'"ignore_eos":true,"stream":true}' % max_tokens)
        await loop.sock_sendall(sock, post("/v1/chat/completions", body))
        head = b""
        while b"\r\n\r\n" not in head:
            head += await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
        conn = next(iter(gw.server.connections))
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield sock, conn
    finally:
        sock.close()


@BOTH_RELAYS
async def test_slow_reader_gets_backpressure_not_buffering(sim_a: SimProcess, offload: bool) -> None:
    """A client that stops reading: the gateway stops reading upstream instead of buffering."""
    loop = asyncio.get_running_loop()
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True,
                               stream_offload=offload) as gw, small_window_stream(gw, 1500) as (sock, conn):
        exchange = conn.listener
        assert isinstance(exchange, Exchange) and exchange.upstream is not None
        # ... and now the client reads nothing
        assert_relayed_by(gw, offload)
        if offload:
            assert gw.gateway.offloader is not None and gw.gateway.offloader.active == 1  # carried in C
            # The relay stops reading upstream: the engine's bytes pile up unread in the
            # gateway's receive queue (bounded by the kernel), not in the gateway's memory.
            up_fd = exchange.upstream.fd
            await wait_until(lambda: _unread(up_fd) > 32 * 1024, 20, "unread upstream bytes to pile up")
        else:
            await wait_until(lambda: conn.write_paused, 20, "the gateway to see the client's full window")
            assert exchange.upstream._paused  # reading upstream stopped: that is the backpressure
            assert conn.transport.get_write_buffer_size() < 256 * 1024  # bounded, not the whole stream
        rest = bytearray()
        while not rest.endswith(b"\r\n0\r\n\r\n"):  # the client reads again: all of it arrives
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 30)
            assert chunk, "connection closed early"
            rest += chunk
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert rest.count(b"data: ") == 1500 + 2  # the role chunk, 1500 tokens (usage cut), [DONE]


@BOTH_RELAYS
async def test_a_client_that_reads_nothing_is_cut_after_the_send_timeout(offload: bool) -> None:
    """Like nginx's send_timeout: the client is cut and the engine's request aborted."""
    async with sim_process("--model", "m1") as sim, running_gateway(
            static_endpoints=(f"m1={sim.url}",), no_auth=True, stream_offload=offload,
            client_send_timeout_s=0.5) as gw:
        before = await aborted(sim)
        async with small_window_stream(gw, 20000):  # ... and from now on the client reads nothing
            await wait_until(lambda: _gt(aborted(sim), before), 10, "the engine to see the abort")
            await wait_until(lambda: handler_tasks(gw) == 0, 5, "the request to end")
            assert_relayed_by(gw, offload)


@BOTH_RELAYS
async def test_a_slow_but_steady_reader_is_not_cut(offload: bool) -> None:
    """The send timeout is between two reads of the client (nginx's send_timeout), not the time
    its window has been full: a client that keeps taking a little gets the whole stream."""
    loop = asyncio.get_running_loop()
    async with sim_process("--model", "m1") as sim, running_gateway(
            static_endpoints=(f"m1={sim.url}",), no_auth=True, stream_offload=offload,
            client_send_timeout_s=1.0) as gw, small_window_stream(gw, 6000) as (sock, _):
        got = bytearray()
        deadline = loop.time() + 3.5  # three and a half send timeouts of reading 4 KiB every 0.1 s
        while loop.time() < deadline:
            await asyncio.sleep(0.1)  # the pace of this client, not a wait for the gateway
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            assert chunk, "the gateway cut a client that was reading"
            got += chunk
        assert not got.endswith(b"\r\n0\r\n\r\n")  # the window stayed full: the test tested something
        while not got.endswith(b"\r\n0\r\n\r\n"):  # then it reads fast: all of it arrives
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 30)
            assert chunk, "connection closed early"
            got += chunk
        assert got.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert_relayed_by(gw, offload)


def _unread(fd: int) -> int:
    """Bytes in a socket's receive queue that nobody has read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]


async def _close_after_head(w: asyncio.StreamWriter) -> None:
    w.write(STREAM_HEAD)
    await w.drain()
    await asyncio.sleep(0.3)  # "prefill" ...
    w.transport.abort()  # ... and the engine dies before its first token


async def _stall_after_head(w: asyncio.StreamWriter) -> None:
    w.write(STREAM_HEAD)
    await asyncio.sleep(30)


async def _bad_framing_after_head(w: asyncio.StreamWriter) -> None:
    w.write(STREAM_HEAD)
    await w.drain()
    await asyncio.sleep(0.05)
    w.write(b"not-hex\r\n")
    await asyncio.sleep(30)


async def _partial_event_then_close(w: asyncio.StreamWriter) -> None:
    w.write(STREAM_HEAD + one_chunk(CHUNK[:10]))  # part of an event: nothing the client can use
    await w.drain()
    await asyncio.sleep(0.05)
    w.transport.abort()


@BOTH_RELAYS
@pytest.mark.parametrize(("script", "status", "code"), [
    (_close_after_head, 502, "closed"), (_stall_after_head, 504, "timeout"),
    (_bad_framing_after_head, 502, "protocol"), (_partial_event_then_close, 502, "closed"),
], ids=["closed", "stalled", "bad-framing", "partial-event"])
async def test_engine_failing_after_its_head_before_the_first_token_gets_a_proper_error(
        offload: bool, script: Script, status: int, code: str) -> None:
    """The held head never reached the client: the answer is a well-formed error response (no
    other endpoint to retry on), never a bare chunk without a status line."""
    async with scripted_upstream(script) as (_, port), running_gateway(
            static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True, stream_offload=offload,
            upstream_read_timeout_s=0.5) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(post("/v1/chat/completions", LONG_STREAM))
            reply = await asyncio.wait_for(read_response(reader), 10)
            assert reply.status == status, reply
            assert reply.headers["content-type"] == "application/json" and reply.headers["x-request-id"]
            assert msgspec.json.decode(reply.body)["error"]["message"].startswith("upstream"), reply.body
            assert f"{code}" in gw.gateway.metrics.render().decode().split("upstream_errors_total{")[1]
            writer.write(post("/v1/chat/completions", LONG_STREAM))  # the connection is still usable
            again = await asyncio.wait_for(read_response(reader), 10)
            assert again.status == status
        finally:
            writer.close()
        assert_relayed_by(gw, offload, streams=2)
        await wait_until(lambda: handler_tasks(gw) == 0, 5, "handler tasks to end")


@BOTH_RELAYS
async def test_engine_dying_before_the_first_token_is_retried_on_another_instance(offload: bool) -> None:
    """The simulator's fault mode kills every stream after its head: the client never sees it,
    the gateway retries on the healthy instance and the SDK gets the whole answer."""
    async with sim_process("--model", "m1", "--fail-after-head-every", "1") as faulty, \
            sim_process("--model", "m1") as healthy, \
            running_gateway(static_endpoints=(f"m1={faulty.url},{healthy.url}",), no_auth=True,
                            stream_offload=offload, eject_after_failures=1000, retry_budget_ratio=1.0) as gw:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        metrics = ""
        try:
            for _ in range(60):  # until the faulty instance was tried (the balancer's choice)
                stream = await client.chat.completions.create(
                    model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=5, stream=True,
                    extra_body={"ignore_eos": True})
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                assert len(text.split()) == 5
                metrics = gw.gateway.metrics.render().decode()
                if f'backend="{faulty.url.removeprefix("http://")}",kind="closed"' in metrics:
                    break
        finally:
            await client.close()
        assert 'kind="closed"' in metrics and "hpcgate_gateway_retries_total{" in metrics, metrics
        # Booked when the loop takes the stream back, which can be just after the client read it.
        await wait_until(lambda: 'status="200"' in gw.gateway.metrics.render().decode(), 5, "200 booked")
        assert 'status="502"' not in gw.gateway.metrics.render().decode()
        if offload:
            off = gw.gateway.offloader
            assert off is not None and off.started >= 2  # the failed try went through the C relay too


async def test_table_sync_stops_when_closed_even_if_its_cancellation_was_lost(redis_prefix: str) -> None:
    """On Python 3.11 a cancellation racing redis-py's read timeout can be swallowed; the worker
    also closes the sync, whose loop then returns by itself (without it a worker's stop hung)."""
    sync = RedisTableSync(REDIS_URL, f"{redis_prefix}close:", resync_s=30, backoff_max_s=1,
                          on_endpoints=lambda _t: 0, on_keys=None)
    task = asyncio.create_task(sync.run())
    await asyncio.wait_for(sync.connected.wait(), 5)
    sync.close()  # and no cancel: as if it had been lost
    await asyncio.wait_for(task, 3)
