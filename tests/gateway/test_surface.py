"""The data plane's surface around the inference calls: request ids, models.retrieve, CORS, /metrics.

A live gateway in front of the simulator, with API keys from PostgreSQL, CORS on for one origin
and a metrics token; the openai SDK where it has a call (``models.retrieve``), raw HTTP for the
rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import openai
import pytest

from gateway.worker import Worker
from tests.gateway.conftest import SECRET, add_tenant, post, raw_exchange, running_gateway
from tests.support.sim import SimProcess

ORIGIN = "https://chat.example.org"
METRICS_TOKEN = "scrape-me"
CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


@pytest.fixture(scope="module")
async def key(pg_dsn: str) -> str:
    return (await add_tenant(pg_dsn, "surface-tenant", allowed=["m1"]))[1]


@pytest.fixture(scope="module")
async def gw(sim_a: SimProcess, pg_dsn: str, key: str) -> AsyncIterator[Worker]:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}", f"m2={sim_a.url}"), database_url=pg_dsn,
                               key_hash_secret=SECRET, cors_allowed_origins=(ORIGIN,),
                               metrics_token=METRICS_TOKEN) as worker:
        yield worker


def _get(path: str, *headers: str) -> bytes:
    lines = "".join(h + "\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{lines}\r\n".encode()


async def test_the_request_id_is_on_every_response_and_reaches_the_engine(gw: Worker, key: str) -> None:
    traced = post("/v1/chat/completions", CHAT, key).replace(
        b"Host: t\r\n", b"Host: t\r\nx-request-id: trace-42\r\n")
    reply = await raw_exchange(gw.port, traced)
    assert reply.status == 200 and reply.headers["x-request-id"] == "trace-42"
    assert reply.json()["id"] == "chatcmpl-trace-42"  # the engine got it (vLLM uses it as its id)
    errors = [
        _get("/nowhere"),  # 404 from the router
        post("/v1/chat/completions", CHAT),  # 401: no key
        _get("/v1/chat/completions", f"Authorization: Bearer {key}"),  # 405
        post("/v1/chat/completions", b"{", key),  # 400
        post("/v1/chat/completions", CHAT.replace(b'"m1"', b'"m2"'), key),  # 403: not allowed
    ]
    for request in errors:
        reply = await raw_exchange(gw.port, request)
        assert reply.status >= 400 and reply.headers.get("x-request-id"), reply
        assert reply.json()["error"]["message"]


async def test_models_retrieve_with_the_openai_sdk(gw: Worker, key: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=key, max_retries=0)
    try:
        model = await client.models.retrieve("m1")
        assert (model.id, model.object, model.owned_by) == ("m1", "model", "hpcgate")
        assert model.model_extra is not None and model.model_extra["state"] == "ready"
        for hidden in ("m2", "no-such-model"):  # not allowed for this key, or unknown: both 404
            with pytest.raises(openai.NotFoundError) as err:
                await client.models.retrieve(hidden)
            assert err.value.code == "model_not_found"
    finally:
        await client.close()


async def test_cors_preflight_and_responses_for_an_allowed_origin_only(gw: Worker, key: str) -> None:
    preflight = ("OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: t\r\nOrigin: {}\r\n"
                 "Access-Control-Request-Method: POST\r\n"
                 "Access-Control-Request-Headers: authorization, content-type\r\n\r\n")
    reply = await raw_exchange(gw.port, preflight.format(ORIGIN).encode())
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in reply.headers["access-control-allow-methods"]
    assert reply.headers["access-control-allow-headers"] == "authorization, content-type"
    other = await raw_exchange(gw.port, preflight.format("https://evil.example").encode())
    assert other.status == 405 and "access-control-allow-origin" not in other.headers
    with_origin = post("/v1/chat/completions", CHAT, key).replace(
        b"Host: t\r\n", f"Host: t\r\nOrigin: {ORIGIN}\r\n".encode())
    reply = await raw_exchange(gw.port, with_origin)
    assert reply.status == 200 and reply.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in reply.headers["access-control-expose-headers"]


async def test_metrics_need_the_metrics_token(gw: Worker, key: str) -> None:
    for auth in ((), (f"Authorization: Bearer {key}",), ("Authorization: Bearer wrong",)):
        reply = await raw_exchange(gw.port, _get("/metrics", *auth))
        assert reply.status == 401
        assert msgspec.json.decode(reply.body)["error"]["code"] == "invalid_metrics_token"
    reply = await raw_exchange(gw.port, _get("/metrics", f"Authorization: Bearer {METRICS_TOKEN}"))
    assert reply.status == 200 and b"hpcgate_gateway_requests_total" in reply.body
    assert (await raw_exchange(gw.port, _get("/health"))).status == 200  # probes stay open
