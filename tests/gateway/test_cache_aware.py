"""Cache-aware routing end to end: a real gateway worker in front of three simulators whose
prefix caches count hits; conversations go back to the instance that holds their history."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import openai

from bench.sim import SimConfig, Simulator, run_simulator
from tests.gateway.conftest import running_gateway
from tests.support.procs import wait_until


@contextlib.asynccontextmanager
async def sims(n: int) -> AsyncIterator[list[Simulator]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(run_simulator(SimConfig(port=0, model=["m1"])))
               for _ in range(n)]


def served(s: Simulator) -> int:
    cache = s.engine.prefix_cache
    assert cache is not None
    return cache.queries


async def chat(client: openai.AsyncOpenAI, conversation: int, turns: int) -> None:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": f"conversation {conversation}: " + "you answer briefly " * 60}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {t} " + "about the cluster " * 20})
        stream = await client.chat.completions.create(model="m1", messages=messages,  # type: ignore[arg-type]
                                                      max_tokens=24, stream=True)
        answer = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        messages.append({"role": "assistant", "content": answer})


async def test_a_conversation_returns_to_its_instance_and_the_engine_counts_hits() -> None:
    async with sims(3) as engines, running_gateway(
            static_endpoints=("m1=" + ",".join(s.url for s in engines),), no_auth=True,
            routing_policy="cache-aware", scrape_interval_s=0.2) as worker:
        gw = worker.gateway
        backends = list(gw.backends.values())
        await wait_until(lambda: all(b.kv_capacity for b in backends), what="KV-cache sizes scraped")
        assert {b.kv_capacity for b in backends} == {s.engine.total_blocks * 16 for s in engines}
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{worker.port}/v1", api_key="x")
        for conversation in range(6):
            before = [served(s) for s in engines]
            await chat(client, conversation, turns=4)
            grew = [s for s, b in zip(engines, before, strict=True) if served(s) > b]
            assert len(grew) == 1, f"conversation {conversation} was spread over {len(grew)} instances"
        await client.close()
        # each request's estimated prefill was counted on its backend exactly while in flight
        assert all(b.inflight == 0 and abs(b.prefill_inflight) < 1e-6 for b in backends)
        hits = [s.engine.prefix_cache.hits for s in engines]  # type: ignore[union-attr]
        queries = [served(s) for s in engines]
        assert sum(hits) > 0.6 * sum(queries)  # turns 2..4 find their history cached
        assert sum(1 for q in queries if q) >= 2  # new conversations were spread, not all on one
        router = gw.prefix_router
        assert router is not None and router.hit_tokens > 0

        async def engine_rates_scraped() -> bool:
            return all(b.prefix_hit_rate is not None and (b.prefix_queries or 0) > 0
                       for b in backends if b.prefix_queries)

        await wait_until(engine_rates_scraped, what="engines' hit rates scraped")
        text = gw.metrics.render().decode()
        assert "hpcgate_gateway_endpoint_prefix_cache_hit_ratio{" in text
        assert "hpcgate_gateway_prefix_index_hit_tokens_total" in text


async def test_least_queue_stays_the_default_and_a_model_can_opt_in() -> None:
    async with sims(2) as engines:
        urls = ",".join(s.url for s in engines)
        async with running_gateway(static_endpoints=(f"m1={urls}",), no_auth=True) as worker:
            assert worker.gateway.prefix_router is None and not worker.gateway.cache_aware
        async with running_gateway(static_endpoints=(f"m1={urls}", f"m2={urls}"), no_auth=True,
                                   routing_policy_models=("m2=cache-aware",)) as worker:
            assert worker.gateway.cache_aware == frozenset({"m2"})
