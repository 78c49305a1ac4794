"""Usage is always booked with the engine's exact counts, whatever the client asks for.

For every combination of endpoint, ``stream`` and ``stream_options`` (absent, null, empty,
``include_usage`` true or false) the tokens the gateway books equal the usage the engine reports
for the same request, and the client's stream holds a usage event exactly when it asked for
one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import msgspec
import pytest

from gateway.worker import Worker
from tests.gateway.conftest import post, raw_exchange, running_gateway
from tests.support.procs import wait_until
from tests.support.sim import SimProcess

_BOOKED = re.compile(
    r'hpcgate_gateway_tokens_total\{kind="(prompt|completion)",model="m1",worker="0"\} ([0-9.]+)')
OPTIONS = {"absent": None, "null": b"null", "empty": b"{}", "include_usage": b'{"include_usage":true}',
           "no_usage": b'{"include_usage":false}'}


@pytest.fixture(scope="module")
async def gw(sim_a: SimProcess) -> AsyncIterator[Worker]:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True) as worker:
        yield worker


def booked(gw: Worker) -> dict[str, float]:
    return {kind: float(n) for kind, n in _BOOKED.findall(gw.gateway.metrics.render().decode())}


def _body(endpoint: str, stream: bool, options: bytes | None) -> bytes:
    payload = (b'"messages":[{"role":"user","content":"count these five words"}]' if endpoint == "chat"
               else b'"prompt":"count these five words"')
    extra = b"" if options is None else b',"stream_options":' + options
    return b'{"model":"m1",%b,"max_tokens":3,"ignore_eos":true,"stream":%b%b}' % (
        payload, b"true" if stream else b"false", extra)


def _usage_events(body: bytes) -> list[dict[str, int]]:
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    return [doc["usage"] for doc in map(msgspec.json.decode, events) if doc.get("usage")]


async def _engine_usage(sim: SimProcess, path: str, endpoint: str) -> dict[str, int]:
    """What the engine reports for the request (asked directly, not streamed)."""
    port = sim.url.rsplit(":", 1)[1]
    reply = await raw_exchange(int(port), post(path, _body(endpoint, False, None)))
    usage: dict[str, int] = msgspec.json.decode(reply.body)["usage"]
    return usage


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize(("stream", "option"), [(False, "absent"), *((True, o) for o in OPTIONS)])
async def test_booked_tokens_equal_the_engines_usage(gw: Worker, sim_a: SimProcess, endpoint: str,
                                                     stream: bool, option: str) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    want = await _engine_usage(sim_a, path, endpoint)
    assert want["completion_tokens"] == 3 and want["prompt_tokens"] > 0
    before = booked(gw)
    reply = await raw_exchange(gw.port, post(path, _body(endpoint, stream, OPTIONS[option])))
    assert reply.status == 200, reply
    expected = {"prompt": before.get("prompt", 0) + want["prompt_tokens"],
                "completion": before.get("completion", 0) + want["completion_tokens"]}
    await wait_until(lambda: booked(gw) == expected, 5, f"{expected} booked (have {booked(gw)})")
    if stream:  # the client sees a usage event exactly when it asked for one
        usage = _usage_events(reply.body)
        if option == "include_usage":
            assert [(u["prompt_tokens"], u["completion_tokens"]) for u in usage] == [
                (want["prompt_tokens"], 3)]
        else:
            assert usage == [], reply.body
