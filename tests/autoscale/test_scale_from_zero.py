"""Scale from zero through the gateway, with the openai SDK: a model with min 0 at zero instances
stays listed, its first request is held (and announced to the autoscaler through Redis) and
answered once a table routes the model; past the hold limit the answer is 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import openai
import pytest
import redis.asyncio as aioredis

from hpcgate.schemas import EndpointEntry, EndpointTable, ModelDemand, ModelEntry, ModelState, RedisNames
from tests.gateway.conftest import running_gateway
from tests.support.procs import wait_until
from tests.support.sim import sim_process

MESSAGES = [{"role": "user", "content": "hi"}]


async def publish(client: aioredis.Redis, names: RedisNames, table: EndpointTable) -> None:
    await client.set(names.endpoint_table, msgspec.json.encode(table))
    await client.publish(names.endpoint_table_channel, str(table.version).encode())


def zero_table(version: int, *endpoints: EndpointEntry, hold_s: float | None = None) -> EndpointTable:
    state = ModelState.READY if endpoints else ModelState.STOPPED
    return EndpointTable(
        version=version,
        generated_at=time.time(),
        endpoints=endpoints,
        models=(
            ModelEntry(
                name="zero",
                aliases=("zero-alias",),
                state=state,
                reason="scaled to zero",
                scale_from_zero=True,
                hold_s=hold_s,
            ),
            ModelEntry(
                name="short",
                state=ModelState.STOPPED,
                reason="scaled to zero",
                scale_from_zero=True,
                hold_s=0.5,
            ),
            ModelEntry(name="off", state=ModelState.STOPPED, reason="scaled to zero"),  # min > 0: no holding
        ),
    )


async def test_a_held_request_is_answered_when_an_instance_arrives(redis_url: str, redis_prefix: str) -> None:
    prefix = f"{redis_prefix}zero:"
    names = RedisNames(prefix)
    client = aioredis.from_url(redis_url)
    try:
        async with running_gateway(redis_url=redis_url, redis_prefix=prefix, no_auth=True) as gw:
            await publish(client, names, zero_table(1))
            await wait_until(lambda: gw.gateway.table.version == 1, 5, "the table")
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
            listed = {m.id: m.model_extra["state"] for m in (await sdk.models.list()).data}  # type: ignore[index]
            assert listed == {"zero": "stopped", "short": "stopped", "off": "stopped"}

            # the first request is held, not refused, and announced as demand within about a second
            held = asyncio.ensure_future(
                sdk.chat.completions.create(model="zero-alias", messages=MESSAGES, max_tokens=3)
            )  # type: ignore[arg-type]
            await wait_until(lambda: gw.gateway.queues.length("zero") == 1, 5, "the request to be held")

            async def announced() -> bool:
                keys = [k async for k in client.scan_iter(match=f"{names.demand_prefix}*")]
                values = await client.mget(keys) if keys else []
                docs = [msgspec.json.decode(v, type=ModelDemand) for v in values if v]
                return any(d.models.get("zero") and d.models["zero"].held == 1 for d in docs)

            await wait_until(announced, 5, "the held request to be announced in Redis")
            assert not held.done()

            # an instance becomes ready: the held request goes out and is answered
            async with sim_process("--model", "zero") as sim:
                ep = EndpointEntry(
                    endpoint_id=1,
                    model="zero",
                    url=sim.url,
                    node=sim.host,
                    port=sim.port,
                    endpoint_job_id=1,
                    ready=True,
                )
                await publish(client, names, zero_table(2, ep))
                reply = await asyncio.wait_for(held, 20)
                assert reply.choices[0].message.content
                assert gw.gateway.queues.length("zero") == 0
    finally:
        await client.aclose()


async def test_past_the_hold_limit_503_with_retry_after_and_a_model_without_autoscaling_at_once(
    redis_url: str, redis_prefix: str
) -> None:
    prefix = f"{redis_prefix}zero-limit:"
    names = RedisNames(prefix)
    client = aioredis.from_url(redis_url)
    try:
        async with running_gateway(redis_url=redis_url, redis_prefix=prefix, no_auth=True) as gw:
            await publish(client, names, zero_table(1))
            await wait_until(lambda: gw.gateway.table.version == 1, 5, "the table")
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                await sdk.chat.completions.create(model="short", messages=MESSAGES)  # type: ignore[arg-type]
            assert time.monotonic() - started >= 0.5
            assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "10"
            assert "no instance was ready within 0.5s" in info.value.message
            assert gw.gateway.queues.length("short") == 0

            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                await sdk.chat.completions.create(model="off", messages=MESSAGES)  # type: ignore[arg-type]
            assert info.value.status_code == 503 and time.monotonic() - started < 0.5
            assert "retry-after" not in info.value.response.headers
    finally:
        await client.aclose()


async def test_the_hold_queue_is_bounded(redis_url: str, redis_prefix: str) -> None:
    prefix = f"{redis_prefix}zero-full:"
    names = RedisNames(prefix)
    client = aioredis.from_url(redis_url)
    try:
        async with running_gateway(redis_url=redis_url, redis_prefix=prefix, no_auth=True, queue_max=1) as gw:
            await publish(client, names, zero_table(1, hold_s=30))
            await wait_until(lambda: gw.gateway.table.version == 1, 5, "the table")
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
            held = asyncio.ensure_future(sdk.chat.completions.create(model="zero", messages=MESSAGES))  # type: ignore[arg-type]
            await wait_until(lambda: gw.gateway.queues.length("zero") == 1, 5, "the first request held")
            with pytest.raises(openai.APIStatusError) as info:
                await sdk.chat.completions.create(model="zero", messages=MESSAGES)  # type: ignore[arg-type]
            assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "10"
            assert "holds as many requests as it may" in info.value.message
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError, openai.APIError):
                await held
    finally:
        await client.aclose()
