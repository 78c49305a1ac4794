"""The simulator over real sockets: vLLM's wire format (checked with the openai SDK), errors,
batching beyond max_num_seqs, abort on disconnect, metric values and legacy names."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import openai
import pytest

from bench.sim import SimConfig, Simulator, run_simulator
from tests.support.procs import wait_until

PROMPT = "one two three four"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(SimConfig(port=0, model=["m", "m-alias"])) as s:
        yield s


async def http(method: str, url: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request with ``connection: close``: status, headers, de-chunked body."""
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{method} /{path} HTTP/1.1\r\nhost: {hostport}\r\nconnection: close\r\n"
                 f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    raw = await reader.read(-1)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while rest:
            size_s, _, rest = rest.partition(b"\r\n")
            size = int(size_s, 16)
            out, rest = out + rest[:size], rest[size + 2:]
        rest = out
    return int(lines[0].split()[1]), headers, rest


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def scrape(s: Simulator) -> str:
    status, _, body = await http("GET", f"{s.url}/metrics")
    assert status == 200
    return body.decode()


async def test_chat_and_completions_with_async_sdk(sim: Simulator) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x")
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert len(content) == 6 and all(content)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 6)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].model == "m"

    comp = await client.completions.create(model="m-alias", prompt=PROMPT, max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert comp.object == "text_completion" and comp.model == "m-alias"
    assert comp.usage is not None and comp.usage.completion_tokens == 3
    assert len(comp.choices[0].text.split()) == 3 and comp.choices[0].finish_reason == "length"

    cstream = await client.completions.create(model="m", prompt=PROMPT, max_tokens=4, stream=True,
                                              extra_body={"ignore_eos": True})
    texts = [c.choices[0].text async for c in cstream if c.choices]
    assert len(texts) == 4

    emb = await client.embeddings.create(model="m", input=["a b", "c d e"])
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 256
    assert emb.usage.prompt_tokens == 5
    # a normalised hashed bag of words: shared words mean similar vectors (docs/simulator.md)
    emb = await client.embeddings.create(model="m", input=[
        "Slurm schedules GPU jobs", "which scheduler runs the GPU jobs?", "bake bread with yeast"])
    doc, query, other = (d.embedding for d in emb.data)
    assert abs(sum(v * v for v in doc) - 1.0) < 1e-9

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(doc, query) > 0.3 > abs(cos(other, query))
    await client.close()


async def test_sync_sdk_and_models(sim: Simulator) -> None:
    def call() -> tuple[list[tuple[str, object]], str, str | None]:
        client = openai.OpenAI(base_url=f"{sim.url}/v1", api_key="x")
        models = [(m.id, getattr(m, "max_model_len", None)) for m in client.models.list().data]
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=2)
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=2, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.close()
        return models, text, chat.choices[0].message.content

    models, text, content = await asyncio.to_thread(call)
    assert models == [("m", 32768), ("m-alias", 32768)]
    assert content and text.strip()


async def test_raw_stream_bytes_are_vllm_shaped(sim: Simulator) -> None:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 2, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    status, headers, raw = await http("POST", f"{sim.url}/v1/completions", json.dumps(body).encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert list(first) == ["id", "object", "created", "model", "choices"]
    assert list(first["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason"]
    usage = json.loads(events[-2].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 4, "total_tokens": 6,
                                                          "completion_tokens": 2}


async def test_errors_have_vllm_shape(sim: Simulator) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.completions.create(model="m", prompt=PROMPT, max_tokens=32768)
    assert too_long.value.status_code == 400
    assert too_long.value.body == {
        "object": "error", "type": "BadRequestError", "param": None, "code": 400,
        "message": "This model's maximum context length is 32768 tokens. However, you requested 32772 "
                   "tokens (4 in the messages, 32768 in the completion). Please reduce the length of the "
                   "messages or completion."}
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.completions.create(model="nope", prompt=PROMPT, max_tokens=1)
    assert isinstance(unknown.value.body, dict) and unknown.value.body["type"] == "NotFoundError"
    status, _, body = await http("POST", f"{sim.url}/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["object"] == "error"
    assert (await http("GET", f"{sim.url}/nowhere"))[0] == 404
    assert (await http("GET", f"{sim.url}/health"))[0] == 200
    await client.close()


async def test_api_key_required_on_v1_only() -> None:
    async with run_simulator(SimConfig(port=0, api_key="sekrit")) as s:
        bad = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        good = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="sekrit")
        assert [m.id async for m in good.models.list()] == ["sim-model"]
        assert (await http("GET", f"{s.url}/health"))[0] == 200
        await bad.close()
        await good.close()


async def test_metric_values_after_known_requests(sim: Simulator) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x")
    for _ in range(2):
        await client.completions.create(model="m", prompt="a b c", max_tokens=5,
                                        extra_body={"ignore_eos": True})
    text = await scrape(sim)
    await client.close()
    assert metric(text, "vllm:prompt_tokens_total", model_name="m") == 6
    assert metric(text, "vllm:generation_tokens_total", model_name="m") == 10
    assert metric(text, "vllm:request_success_total", finished_reason="length") == 2
    assert metric(text, "vllm:time_to_first_token_seconds_count", model_name="m", engine="0") == 2
    assert metric(text, "vllm:e2e_request_latency_seconds_count") == 2
    assert metric(text, "vllm:request_queue_time_seconds_count") == 2
    assert metric(text, "vllm:num_requests_running") == 0
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0' in text
    assert "vllm:gpu_cache_usage_perc" not in text


async def test_legacy_metric_names() -> None:
    async with run_simulator(SimConfig(port=0, legacy_metrics=True)) as s:
        text = await scrape(s)
    assert 'vllm:gpu_cache_usage_perc{model_name="sim-model"}' in text
    assert "vllm:kv_cache_usage_perc" not in text and 'engine="0"' not in text


async def test_queueing_beyond_max_num_seqs_and_abort_on_disconnect() -> None:
    # gpu-s steps are ~50 ms, so 200-token streams stay in flight while we look.
    async with run_simulator(SimConfig(port=0, profile="gpu-s", max_num_seqs=2)) as s:
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="x")
        streams = [await client.completions.create(model="sim-model", prompt=PROMPT, max_tokens=200,
                                                   stream=True, extra_body={"ignore_eos": True})
                   for _ in range(2)]
        pending = [asyncio.create_task(client.completions.create(
            model="sim-model", prompt=PROMPT, max_tokens=200, stream=True, extra_body={"ignore_eos": True}))
            for _ in range(3)]

        async def queued() -> bool:
            text = await scrape(s)
            running = metric(text, "vllm:num_requests_running")
            return running == 2 and metric(text, "vllm:num_requests_waiting") == 3

        await wait_until(queued, timeout=10, what="2 running and 3 waiting")
        kv = metric(await scrape(s), "vllm:kv_cache_usage_perc")
        assert kv > 0

        first = await streams[0].__anext__()  # a token arrived; now the client goes away
        assert first.choices
        await streams[0].close()

        async def aborted() -> bool:
            text = await scrape(s)
            return (metric(text, "vllm:request_success_total", finished_reason="abort") == 1
                    and metric(text, "vllm:num_requests_waiting") == 2
                    and metric(text, "vllm:num_requests_running") == 2)

        await wait_until(aborted, timeout=10, what="abort counted and a waiting request admitted")
        assert s.aborted == 1
        for st in streams[1:]:
            await st.close()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await client.close()
