"""Backfill: batch requests yield to interactive ones in the gateway's admission, and the pure
parts of the batch machinery (validation, pacing) fed with data."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import pytest

from control.batch.pacing import Pacer
from control.batch.validate import split_lines, validate_lines
from gateway.admission import ModelQueues
from hpcgate.metrics_text import parse_engine_load
from hpcgate.schemas import EndpointEntry, EndpointTable, ModelEntry, ModelState
from tests.batch.conftest import MODEL, TOKEN, BatchStack, chat_line
from tests.gateway.conftest import SECRET, add_tenant, post, raw_exchange, running_gateway
from tests.support.procs import wait_until
from tests.support.sim import sim_process


def _body(max_tokens: int) -> bytes:
    return json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


async def _send(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


def _batch_request(tenant_id: int, body: bytes) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"x-hpcgate-internal-token: {TOKEN}\r\nx-hpcgate-tenant-id: {tenant_id}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def test_batch_request_waits_behind_interactive(batch_stack: BatchStack) -> None:
    tenant_id, key = await add_tenant(batch_stack.dsn, "backfill-order")
    async with running_gateway(static_endpoints=(f"{MODEL}={batch_stack.sim.url}",),
                               database_url=batch_stack.dsn,
                               key_hash_secret=SECRET, internal_token=TOKEN, endpoint_max_inflight=1) as gw:
        queues = gw.gateway.queues
        # One interactive stream holds the only slot.
        r0, w0 = await _send(gw.port, post("/v1/chat/completions", _body(2000), key))
        assert (await asyncio.wait_for(r0.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        # A batch request arrives first, then an interactive one: both wait.
        rb, wb = await _send(gw.port, _batch_request(tenant_id, _body(4)))
        await wait_until(lambda: queues.batch_length(MODEL) == 1, 10, "the batch request to wait")
        ri, wi = await _send(gw.port, post("/v1/chat/completions", _body(4), key))
        await wait_until(lambda: queues.length(MODEL) == 1, 10, "the interactive request to wait")
        w0.transport.abort()  # the slot frees: the interactive request goes first
        head = await asyncio.wait_for(ri.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert queues.batch_length(MODEL) == 1  # the batch request still waits behind it
        await asyncio.wait_for(ri.readuntil(b"\r\n0\r\n\r\n"), 10)  # the interactive stream ends
        head_b = await asyncio.wait_for(rb.readuntil(b"\r\n\r\n"), 10)
        assert head_b.startswith(b"HTTP/1.1 200") and queues.batch_length(MODEL) == 0
        for w in (wb, wi):
            w.transport.abort()


async def test_batch_marker_needs_the_internal_token(batch_stack: BatchStack) -> None:
    tenant_id, _ = await add_tenant(batch_stack.dsn, "backfill-forged")
    async with running_gateway(static_endpoints=(f"{MODEL}={batch_stack.sim.url}",),
                               database_url=batch_stack.dsn,
                               key_hash_secret=SECRET, internal_token=TOKEN) as gw:
        forged = _batch_request(tenant_id, _body(2)).replace(TOKEN.encode(), b"guessed-token-123456")
        r, w = await _send(gw.port, forged)
        assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 401")
        w.transport.abort()


async def test_model_queue_wakes_interactive_before_batch() -> None:
    queues = ModelQueues(asyncio.get_running_loop())
    order: list[str] = []

    async def wait(name: str, batch: bool) -> None:
        await queues.wait("m", 10, 5.0, batch=batch)
        order.append(name)

    tasks = [asyncio.create_task(wait("batch-1", True))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(wait("chat-1", False)), asyncio.create_task(wait("chat-2", False))]
    await asyncio.sleep(0)
    for _ in range(3):
        queues.wake(frozenset({"m"}))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["chat-1", "chat-2", "batch-1"]


def test_pacer_grows_while_idle_and_halves_when_requests_wait() -> None:
    p = Pacer(1, 12, patience=2)
    assert [p.step(0, False, p.limit) for _ in range(3)] == [2, 4, 8]  # slow start
    assert p.step(0, False, 0) == 8  # an unused limit does not grow
    assert p.step(3, False, 8) == 8  # a queue once: hold (a request between two engine steps)
    assert p.step(0, False, 8) == 12  # gone: grow again
    assert [p.step(3, False, 12) for _ in range(2)] == [12, 6]  # a queue that stays: back off
    assert [p.step(0, False, p.limit) for _ in range(2)] == [7, 8]  # then one at a time
    assert p.step(None, True, 8) == 4  # pushed back by the gateway: at once
    assert p.step(None, False, 4) == 5  # no scrape, no push-back: grow
    p.limit = 12
    assert p.step(0, False, 12) == 12  # never above the maximum


@pytest.mark.parametrize(("line", "code"), [
    (b"{not json", "invalid_json"),
    (b"[1]", "invalid_request"),
    (json.dumps({**chat_line("a"), "method": "PUT"}).encode(), "invalid_method"),
    (json.dumps({**chat_line("a"), "url": "/v1/completions"}).encode(), "mismatched_url"),
    (json.dumps({**chat_line("a"), "custom_id": ""}).encode(), "missing_custom_id"),
    (json.dumps({**chat_line("a"), "body": {"messages": []}}).encode(), "missing_model"),
    (json.dumps(chat_line("a", model="secret-model")).encode(), "model_not_allowed"),
])
def test_validation_names_line_and_reason(line: bytes, code: str) -> None:
    data = json.dumps(chat_line("ok")).encode() + b"\n" + line + b"\n"

    def resolve(model: str) -> tuple[str | None, str]:
        return (model, "") if model == MODEL else (None, "not allowed")

    got = validate_lines(split_lines(io.BytesIO(data)), "/v1/chat/completions", resolve, max_lines=10)
    assert got.records == [] and [(e.line, e.code) for e in got.errors] == [(2, code)]


def test_validation_limits_and_offsets() -> None:
    lines = [json.dumps(chat_line(f"c{i}")).encode() for i in range(3)]
    data = b"\n".join(lines) + b"\n\n"
    ep = "/v1/chat/completions"
    ok = validate_lines(split_lines(io.BytesIO(data)), ep, lambda m: (m, ""), max_lines=3)
    assert [(r.line_no, r.offset, r.length) for r in ok.records] == [
        (1, 0, len(lines[0])), (2, len(lines[0]) + 1, len(lines[1])),
        (3, len(lines[0]) + len(lines[1]) + 2, len(lines[2]))]
    over = validate_lines(split_lines(io.BytesIO(data)), ep, lambda m: (m, ""), max_lines=2)
    assert [e.code for e in over.errors] == ["too_many_lines"]
    empty = validate_lines(split_lines(io.BytesIO(b"\n")), ep, lambda m: (m, ""), max_lines=2)
    assert [e.code for e in empty.errors] == ["empty_file"]


async def test_priority_is_set_for_batch_requests_where_the_endpoint_announces_it(pg_dsn: str) -> None:
    """An engine with vLLM's priority scheduling (the simulator's, one sequence at a time) runs an
    interactive request before batch requests that reached it earlier: the gateway gave the batch
    requests a lower priority because the endpoint announced it."""
    tenant_id, key = await add_tenant(pg_dsn, "backfill-priority")
    async with sim_process("--model", MODEL, "--profile", "paced", "--max-num-seqs", "1",
                           "--scheduling-policy", "priority") as sim, \
            running_gateway(static_endpoints=(f"{MODEL}=http://127.0.0.1:9",), database_url=pg_dsn,
                            key_hash_secret=SECRET, internal_token=TOKEN) as gw:
        gw.gateway.install_endpoints(EndpointTable(
            version=2**62, generated_at=0.0, models=(ModelEntry(name=MODEL, state=ModelState.READY),),
            endpoints=(EndpointEntry(endpoint_id=1, model=MODEL, url=sim.url, node="127.0.0.1", port=sim.port,
                                     endpoint_job_id=1, ready=True, priority=True),)))
        r0, w0 = await _send(gw.port, post("/v1/chat/completions", _body(2000), key))  # holds the engine
        assert (await asyncio.wait_for(r0.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        done: list[str] = []

        async def one(name: str, data: bytes) -> None:
            reply = await raw_exchange(gw.port, data, timeout=30)
            assert reply.status == 200, reply.body
            done.append(name)

        plain = json.dumps({"model": MODEL, "max_tokens": 4, "ignore_eos": True,
                            "messages": [{"role": "user", "content": "hi"}]}).encode()
        batch = [asyncio.create_task(one(f"batch-{i}", _batch_request(tenant_id, plain))) for i in range(3)]
        await wait_until(lambda: _engine_waiting(sim.url, 3), 10, "the batch requests to wait in the engine")
        chat = asyncio.create_task(one("chat", post("/v1/chat/completions", plain, key)))
        await wait_until(lambda: _engine_waiting(sim.url, 4), 10, "the interactive request to wait too")
        w0.transport.abort()  # the engine's one slot frees
        await asyncio.gather(chat, *batch)
        assert done[0] == "chat", done


async def _engine_waiting(url: str, n: int) -> bool:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).content
    return parse_engine_load(text).waiting == n


async def test_batch_requests_leave_headroom_for_interactive(batch_stack: BatchStack) -> None:
    tenant_id, key = await add_tenant(batch_stack.dsn, "backfill-headroom")
    async with running_gateway(static_endpoints=(f"{MODEL}={batch_stack.sim.url}",),
                               database_url=batch_stack.dsn, key_hash_secret=SECRET, internal_token=TOKEN,
                               endpoint_max_inflight=2, batch_headroom=0.5) as gw:
        queues = gw.gateway.queues
        r0, w0 = await _send(gw.port, _batch_request(tenant_id, _body(2000)))  # the batch share: 1 slot
        assert (await asyncio.wait_for(r0.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        _, wb = await _send(gw.port, _batch_request(tenant_id, _body(4)))
        await wait_until(lambda: queues.batch_length(MODEL) == 1, 10, "the second batch request to wait")
        ri, wi = await _send(gw.port, post("/v1/chat/completions", _body(4), key))
        head = await asyncio.wait_for(ri.readuntil(b"\r\n\r\n"), 10)  # the free slot is interactive's
        assert head.startswith(b"HTTP/1.1 200") and queues.batch_length(MODEL) == 1
        for w in (w0, wb, wi):
            w.transport.abort()
