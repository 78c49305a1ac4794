"""Every JSON inference path vLLM serves, routed by ``model`` like chat, and booked like chat.

The Responses API through the ``openai`` SDK (whole and streamed), the pooling and scoring
routes (rerank, score, pooling, classify) and tokenize/detokenize as raw HTTP: each reaches the
engine on the same path with the body unchanged (an alias replaced by the model's name), and
the tokens the gateway books equal the usage the engine reports.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import msgspec
import openai
import pytest

from gateway.sse import usage_of
from gateway.worker import Worker
from tests.gateway.conftest import post, raw_exchange, running_gateway
from tests.support.procs import wait_until
from tests.support.sim import SimProcess

_BOOKED = re.compile(
    r'hpcgate_gateway_tokens_total\{kind="(prompt|completion)",model="m1",worker="0"\} ([0-9.]+)')


@pytest.fixture(scope="module")
async def gw(sim_a: SimProcess) -> AsyncIterator[Worker]:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True) as worker:
        yield worker


def booked(gw: Worker) -> tuple[float, float]:
    got = {kind: float(n) for kind, n in _BOOKED.findall(gw.gateway.metrics.render().decode())}
    return got.get("prompt", 0.0), got.get("completion", 0.0)


async def expect_booked(gw: Worker, before: tuple[float, float], prompt: int, completion: int) -> None:
    want = (before[0] + prompt, before[1] + completion)
    await wait_until(lambda: booked(gw) == want, 5, f"{want} booked (have {booked(gw)})")


def sdk(gw: Worker) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="unused", max_retries=0)


async def test_responses_with_the_openai_sdk(gw: Worker) -> None:
    client = sdk(gw)
    before = booked(gw)
    resp = await client.responses.create(model="m1", input="name three colours", max_output_tokens=5)
    assert resp.status == "completed" and resp.output_text.strip()
    assert resp.usage is not None and 1 <= resp.usage.output_tokens <= 5
    await expect_booked(gw, before, resp.usage.input_tokens, resp.usage.output_tokens)
    await client.close()


async def test_streamed_responses_with_the_openai_sdk(gw: Worker) -> None:
    client = sdk(gw)
    before = booked(gw)
    stream = await client.responses.create(model="m1", input=[{"role": "user", "content": "tell a story"}],
                                           max_output_tokens=6, stream=True)
    deltas, last = [], None
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        last = event
    assert last is not None and last.type == "response.completed"
    usage = last.response.usage  # type: ignore[union-attr]
    assert usage is not None and usage.output_tokens == len(deltas) >= 1
    assert "".join(deltas) == last.response.output_text  # type: ignore[union-attr]
    await expect_booked(gw, before, usage.input_tokens, usage.output_tokens)
    await client.close()


# path, body, a key of the answer, whether the engine reports usage for it
CASES = [
    ("/v1/rerank", b'{"model":"m1","query":"a b","documents":["c d e","f"]}', "results", True),
    ("/rerank", b'{"model":"m1","query":"a","documents":["b"],"top_n":1}', "results", True),
    ("/v2/rerank", b'{"model":"m1","query":"a","documents":["b","c"]}', "results", True),
    ("/v1/score", b'{"model":"m1","text_1":"a b","text_2":["c","d e"]}', "data", True),
    ("/score", b'{"model":"m1","text_1":"a","text_2":"b"}', "data", True),
    ("/pooling", b'{"model":"m1","input":["one two","three"]}', "data", True),
    ("/classify", b'{"model":"m1","input":"this is great"}', "data", True),
    ("/tokenize", b'{"model":"m1","prompt":"the model answers"}', "tokens", False),
    ("/detokenize", b'{"model":"m1","tokens":[0,1,2]}', "prompt", False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_json_paths_are_relayed_and_booked(gw: Worker, sim_a: SimProcess,
                                                 case: tuple[str, bytes, str, bool]) -> None:
    path, body, key, has_usage = case
    direct = await raw_exchange(int(sim_a.url.rsplit(":", 1)[1]), post(path, body))
    assert direct.status == 200, direct
    usage = usage_of(direct.body)
    tokens = usage.counts() if usage is not None else (0, 0)
    assert (tokens[0] > 0) == has_usage and tokens[1] == 0
    before = booked(gw)
    reply = await raw_exchange(gw.port, post(path, body))
    assert reply.status == 200, reply
    doc = msgspec.json.decode(reply.body)
    assert key in doc
    if path == "/detokenize":
        assert doc["prompt"] == "the model answers"
    elif path == "/tokenize":
        assert doc["count"] == 3
    await expect_booked(gw, before, *tokens)


@pytest.mark.parametrize(("path", "body", "reason"), [
    ("/v1/rerank", b'{"model":"m1","query":"a"}', "missing required field 'documents'"),
    ("/v1/score", b'{"model":"m1","text_1":"a","text_2":3}', "'text_2' must be a string or an array"),
    ("/tokenize", b'{"model":"m1"}', "missing required field 'prompt' or 'messages'"),
    ("/pooling", b'{"model":"m1","input":"a","stream":true}', "pooling cannot be streamed"),
    ("/v1/responses", b'{"model":"m1"}', "missing required field 'input'"),
    ("/classify", b'{"input":"a"}', "model"),
])
async def test_bad_bodies_get_400_with_the_reason(gw: Worker, path: str, body: bytes, reason: str) -> None:
    reply = await raw_exchange(gw.port, post(path, body))
    assert reply.status == 400 and reason in reply.json()["error"]["message"], reply


async def test_unknown_model_on_a_new_path_is_404(gw: Worker) -> None:
    reply = await raw_exchange(gw.port, post("/v1/rerank", b'{"model":"nope","query":"a","documents":["b"]}'))
    assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"
