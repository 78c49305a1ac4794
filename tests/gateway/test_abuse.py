"""Abuse limits per client address: failed API keys (429 + Retry-After) and open connections
(503), in memory, other addresses unaffected; behind a trusted proxy the forwarded address counts.

Live gateways with keys from PostgreSQL; the clients connect from several loopback addresses
(127.0.0.1, .2, .3: Linux routes all of 127/8 to lo) to be several clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.client_guard import (
    ConnectionCounter,
    FailedAuthLimiter,
    TrustedProxies,
    forwarded_client,
    parse_networks,
)
from gateway.settings import load_gateway_settings
from hpcgate.settings import SettingsError
from tests.gateway.conftest import SECRET, Reply, add_tenant, post, read_response, running_gateway
from tests.support.procs import child_env, hpcgate_cmd, wait_until
from tests.support.sim import SimProcess

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'

# ----------------------------------------------------------------------------- pure


def test_failed_keys_are_counted_per_address_in_windows() -> None:
    limiter = FailedAuthLimiter(3, window_s=60)
    assert not limiter.active
    for t in (0.0, 1.0):
        limiter.failed("a", t)
    assert limiter.retry_after("a", 2.0) is None  # two failures: still allowed
    limiter.failed("a", 2.0)
    assert limiter.retry_after("a", 2.0) == 58 and limiter.retry_after("a", 59.5) == 1
    assert limiter.retry_after("b", 2.0) is None  # another address is not touched
    assert limiter.retry_after("a", 60.0) is None  # the window ended
    limiter.failed("a", 61.0)  # a new window starts with one failure
    assert limiter.retry_after("a", 61.0) is None
    limiter.prune(120.0)
    assert len(limiter) == 1  # a's window began at 61: kept until 121
    limiter.prune(121.0)
    assert not limiter.active


def test_the_failure_table_is_bounded_and_a_zero_limit_is_off() -> None:
    limiter = FailedAuthLimiter(1, max_tracked=2)
    for address in ("a", "b", "c"):
        limiter.failed(address, 0.0)
    assert len(limiter) == 2 and limiter.retry_after("c", 0.0) is None
    off = FailedAuthLimiter(0)
    off.failed("a", 0.0)
    assert not off.active and off.retry_after("a", 0.0) is None


def test_connections_are_capped_per_address_and_released() -> None:
    counter = ConnectionCounter(2)
    assert counter.admit("a") and counter.admit("a") and not counter.admit("a")
    assert counter.admit("b")
    counter.release("a")
    assert counter.open("a") == 1 and counter.admit("a")
    for _ in range(3):
        counter.release("a")  # more releases than admits never go below zero
    assert counter.open("a") == 0 and len(counter) == 1
    unlimited = ConnectionCounter(0)
    assert all(unlimited.admit("a") for _ in range(10_000))


def test_proxies_and_forwarded_addresses() -> None:
    trusted = TrustedProxies(parse_networks(["10.0.0.0/8", "::1"]))
    assert "10.1.2.3" in trusted and "::1" in trusted
    assert "11.0.0.1" not in trusted and "not-an-ip" not in trusted and "" not in trusted
    assert "10.1.2.3" not in TrustedProxies(())
    assert forwarded_client("10.0.0.1", b"198.51.100.1, 203.0.113.9") == "203.0.113.9"  # what the proxy added
    assert forwarded_client("10.0.0.1", None) == "10.0.0.1"
    assert forwarded_client("10.0.0.1", b" , ") == "10.0.0.1"
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_networks(["10.0.0.0/33"])
    with pytest.raises(SettingsError, match="trusted_proxies"):
        load_gateway_settings(env={"HPCGATE_GATEWAY_TRUSTED_PROXIES": '["nope"]',
                                   "HPCGATE_GATEWAY_NO_AUTH": "true",
                                   "HPCGATE_GATEWAY_STATIC_ENDPOINTS": '["m=http://127.0.0.1:1"]'})


# ----------------------------------------------------------------------------- live


@contextlib.asynccontextmanager
async def connection(port: int, source: str) -> AsyncIterator[Stream]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        yield reader, writer
    finally:
        writer.close()


async def ask(port: int, request: bytes, source: str = "127.0.0.1") -> Reply:
    async with connection(port, source) as (reader, writer):
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), 10)


def chat(key: str, forwarded_for: str | None = None) -> bytes:
    request = post("/v1/chat/completions", CHAT, key)
    if forwarded_for is not None:
        request = request.replace(b"Host: t\r\n", f"Host: t\r\nX-Forwarded-For: {forwarded_for}\r\n".encode())
    return request


@pytest.fixture(scope="module")
async def key(pg_dsn: str) -> str:
    return (await add_tenant(pg_dsn, "abuse-tenant"))[1]


async def test_guessing_keys_is_slowed_for_that_address_only(sim_a: SimProcess, pg_dsn: str,
                                                             key: str) -> None:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), database_url=pg_dsn,
                               key_hash_secret=SECRET, auth_failures_per_minute=4) as gw:
        assert (await ask(gw.port, chat(key))).status == 200
        for n in range(4):
            reply = await ask(gw.port, chat(f"hpg_guess{n}"))
            assert reply.status == 401, reply
        for request in (chat("hpg_guess9"), chat(key)):  # now every key from there waits, the right one too
            reply = await ask(gw.port, request)
            assert reply.status == 429 and 0 < int(reply.headers["retry-after"]) <= 60, reply
            assert reply.json()["error"]["code"] == "auth_rate_limited"
            assert "127.0.0.1" in reply.json()["error"]["message"]
        assert (await ask(gw.port, chat(key), source="127.0.0.2")).status == 200  # someone else: served
        assert (await ask(gw.port, post("/v1/chat/completions", CHAT), source="127.0.0.2")).status == 401
        for _ in range(6):  # a request without any key is not a guess: never counted
            assert (await ask(gw.port, post("/v1/chat/completions", CHAT), source="127.0.0.2")).status == 401
        assert (await ask(gw.port, chat(key), source="127.0.0.2")).status == 200
        metrics = (await ask(gw.port, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")).body.decode()
        assert 'hpcgate_gateway_auth_rate_limited_total{worker="0"} 2.0' in metrics


async def test_behind_a_trusted_proxy_the_forwarded_client_counts(sim_a: SimProcess, pg_dsn: str,
                                                                 key: str) -> None:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), database_url=pg_dsn,
                               key_hash_secret=SECRET, auth_failures_per_minute=2,
                               trusted_proxies=("127.0.0.3/32",)) as gw:
        for _ in range(2):
            assert (await ask(gw.port, chat("hpg_bad", "203.0.113.7"), source="127.0.0.3")).status == 401
        assert (await ask(gw.port, chat(key, "203.0.113.7"), source="127.0.0.3")).status == 429
        assert (await ask(gw.port, chat(key, "203.0.113.8"), source="127.0.0.3")).status == 200
        # an untrusted peer cannot pick its address with the header
        for _ in range(2):
            assert (await ask(gw.port, chat("hpg_bad", "203.0.113.99"), source="127.0.0.4")).status == 401
        assert (await ask(gw.port, chat(key, "203.0.113.50"), source="127.0.0.4")).status == 429


async def test_one_address_cannot_hold_every_connection(sim_a: SimProcess) -> None:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True,
                               max_connections_per_address=3) as gw, contextlib.AsyncExitStack() as held:
        for _ in range(3):
            reader, writer = await held.enter_async_context(connection(gw.port, "127.0.0.1"))
        await wait_until(lambda: len(gw.server.connections) == 3, 5, "three connections to be accepted")
        refused = await ask(gw.port, chat("x"))
        assert refused.status == 503 and refused.headers["retry-after"] == "1", refused
        assert "too many open connections from 127.0.0.1" in refused.json()["error"]["message"]
        assert (await ask(gw.port, chat("x"), source="127.0.0.2")).status == 200
        writer.write(chat("x"))  # a held connection still works
        await writer.drain()
        assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
        writer.close()  # one closes: its slot is free again

        async def admitted() -> bool:
            return (await ask(gw.port, chat("x"))).status == 200

        await wait_until(admitted, 5, "a freed slot to admit a new connection")


async def test_the_gateway_takes_its_hard_descriptor_limit_and_warns_when_it_is_too_low() -> None:
    """Debian's soft limit is 1024: without raising it, the 1021st client fails at accept()."""
    gateway = " ".join(hpcgate_cmd("gateway", "--no-auth", "--port", "0",
                                   "--static-endpoint", "m=http://127.0.0.1:9"))
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", f"ulimit -Sn 512 && ulimit -Hn 4096 && exec {gateway}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"gateway_listening" in line, line
        limits = await asyncio.to_thread(Path(f"/proc/{proc.pid}/limits").read_text)
        soft_hard = next(ln for ln in limits.splitlines() if ln.startswith("Max open files")).split()[3:5]
        assert soft_hard == ["4096", "4096"], soft_hard
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    warning = next(json.loads(ln) for ln in err.splitlines() if b"descriptor_limit_low" in ln)
    assert warning["nofile"] == 4096 and warning["needed"] == 2 * 10_000 + 1024
