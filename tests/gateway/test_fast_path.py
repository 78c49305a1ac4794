"""The task-free request path's failures before the first byte (see gateway/proxy.py).

A request on an idle keep-alive connection is sent from the client's protocol callback; when
that connection fails before the response head, or answers 5xx, the request continues in a
task and is retried. A faulty TCP proxy in front of the simulator makes those failures happen
on reused connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.worker import Worker
from tests.gateway.conftest import handler_tasks, post, raw_exchange, running_gateway
from tests.gateway.cut_proxy import CuttableProxy
from tests.support.procs import wait_until
from tests.support.sim import SimProcess

pytestmark = pytest.mark.serial  # timing-sensitive: ./dev.sh test runs it after the parallel rest

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
CHAT_STREAM = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true}'
ANSWER_503 = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
              b"content-length: 2\r\n\r\n{}")


@pytest.fixture
async def faulty(sim_a: SimProcess) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy("127.0.0.1", sim_a.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def idle_upstreams(gw: Worker) -> int | None:
    """Upstream connections back in their pools, or None while any open one is still out: a
    relayed stream's end reaches the client from the relay's thread, and its connection returns
    to the pool on the event loop a moment later. A request sent before then opens a fresh
    connection, which the tests here must not mistake for a reused one."""
    pools = [b.pool for b in gw.gateway.backends.values()]
    if any(p.open_count != p.idle_count for p in pools):
        return None
    return sum(p.idle_count for p in pools)


async def metrics_text(port: int) -> str:
    return (await raw_exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")).body.decode()


@pytest.mark.parametrize("body", [CHAT, CHAT_STREAM], ids=["plain", "stream"])
async def test_reused_connection_closed_before_head_is_retried_without_blame(
        faulty: CuttableProxy, body: bytes) -> None:
    async with running_gateway(static_endpoints=(f"m1=http://127.0.0.1:{faulty.port}",), no_auth=True) as gw:
        assert (await raw_exchange(gw.port, post("/v1/chat/completions", body))).status == 200
        await wait_until(lambda: idle_upstreams(gw), 5, "the first request's connection to be idle")
        faulty.drop_next = 1  # the idle connection the first request left behind is dropped
        reply = await raw_exchange(gw.port, post("/v1/chat/completions", body))
        assert reply.status == 200, reply.body
        assert faulty.dropped == 1
        assert "hpcgate_gateway_upstream_errors_total{" not in await metrics_text(gw.port)
        # dropped again on the fresh connection: the only endpoint failed, so 502 (not a hang)
        faulty.drop_next = 2
        reply = await raw_exchange(gw.port, post("/v1/chat/completions", body))
        assert reply.status == 502, reply.body
        assert reply.json()["error"]["code"] == "upstream_error"
        await wait_until(lambda: handler_tasks(gw) == 0, 5, "requests to end")


@pytest.mark.parametrize("body", [CHAT, CHAT_STREAM], ids=["plain", "stream"])
async def test_5xx_on_a_reused_connection_is_retried_on_another_endpoint(
        faulty: CuttableProxy, sim_b: SimProcess, body: bytes) -> None:
    faulty.answer_reused = ANSWER_503
    async with running_gateway(static_endpoints=(f"m1=http://127.0.0.1:{faulty.port},{sim_b.url}",),
                               no_auth=True, eject_after_failures=1000, retry_budget_ratio=1.0) as gw:
        # Least-queue spreads requests over both endpoints; send until one has met the 503 on a
        # reused connection (how many that takes depends on scrape timing), each one a 200.
        for _ in range(200):
            reply = await raw_exchange(gw.port, post("/v1/chat/completions", body))
            assert reply.status == 200, reply.body
            if faulty.answered >= 2:
                break
            await wait_until(lambda: idle_upstreams(gw) is not None, 5, "the connections to be idle")
        assert faulty.answered >= 2  # requests met the 503 and succeeded elsewhere
        text = await metrics_text(gw.port)
        assert 'kind="http_503"' in text and "hpcgate_gateway_retries_total" in text
        await wait_until(lambda: handler_tasks(gw) == 0, 5, "requests to end")
