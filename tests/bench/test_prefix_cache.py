"""The simulator's prefix cache: chained block hashes, hits, LRU eviction, the engine's prefill
work and the exported counters (pure code with a fake clock, plus one scrape of a real server)."""

from __future__ import annotations

import openai

from bench.sim import SimConfig, run_simulator
from bench.sim.engine import FINISHED, Engine, Seq
from bench.sim.prefix_cache import PrefixCache, SeqPrefix
from bench.sim.profiles import Profile
from tests.bench.test_engine import Recorder, run_steps
from tests.bench.test_sim_wire import metric, scrape

BS = 16
PROFILE = Profile(name="t", base_s=0.01, per_seq_s=0.0, per_prefill_token_s=0.001, per_context_token_s=0.0,
                  max_num_seqs=8, max_num_batched_tokens=4096, kv_cache_tokens=16 * 64, block_size=BS)


def words(n: int, tag: str = "w") -> list[str | int]:
    return [f"{tag}{i}" for i in range(n)]


class Steps(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.prefill: list[int] = []

    def on_step(self, prefill_tokens: int, generated_tokens: int, preempted: int) -> None:
        if prefill_tokens:
            self.prefill.append(prefill_tokens)


def submit(engine: Engine, rec: Recorder, tokens: list[str | int], out: int = 1) -> Seq:
    s = Seq(len(tokens), out, max_tokens=out, seed=7, sink=rec, arrival=0.0)
    s.prefix = SeqPrefix(tokens, seed=7)
    engine.add(s)
    return s


def test_hashes_are_chained_over_full_blocks_only() -> None:
    a = SeqPrefix(words(40), seed=1)
    b = SeqPrefix(words(16) + words(24, "x"), seed=1)
    ha, hb = a.hash_blocks(2, BS), b.hash_blocks(2, BS)
    assert ha[0] == hb[0] and ha[1] != hb[1]  # same first block, different second
    # the same block content after a different prefix hashes differently (the chain)
    c = SeqPrefix(words(16, "y") + words(32)[16:32], seed=1)
    assert c.hash_blocks(2, BS)[1] != ha[1]
    assert len(a.hash_blocks(40 // BS, BS)) == 2  # the 8 tokens past two blocks are not a block


def test_hit_is_the_cached_leading_blocks_capped_below_the_prompt() -> None:
    cache = PrefixCache(BS)
    first = SeqPrefix(words(48), seed=1)
    assert cache.admit(first, 48, free_blocks=100) == 0
    cache.computed(first, 48)
    cache.release(first, 48)
    # an identical prompt: 3 cached blocks but at least one token must be computed -> 2 blocks
    assert cache.admit(SeqPrefix(words(48), seed=1), 48, free_blocks=100) == 32
    # a longer prompt sharing the 48 tokens hits all 3
    assert cache.admit(SeqPrefix(words(48) + words(10, "z"), seed=1), 58, free_blocks=100) == 48
    # diverging inside block 2: only block 1 hits
    assert cache.admit(SeqPrefix(words(20) + words(40, "q"), seed=1), 60, free_blocks=100) == 16
    assert cache.queries == 48 + 48 + 58 + 60 and cache.hits == 32 + 48 + 16


def test_free_blocks_are_evicted_least_recently_freed_tail_first() -> None:
    cache = PrefixCache(BS)
    a, b = SeqPrefix(words(32, "a"), seed=1), SeqPrefix(words(32, "b"), seed=1)
    for sp in (a, b):
        cache.admit(sp, 33, free_blocks=100)
        cache.release(sp, 32)
    assert cache.cached_blocks == 4
    cache.fit(3)  # the pool needs one cached block: a's tail goes first (a freed first, tail first)
    assert cache.evictions == 1
    assert cache.contains(a.hashes[0]) and not cache.contains(a.hashes[1])
    assert cache.admit(SeqPrefix([*words(32, "a"), "t"], seed=1), 33, free_blocks=100) == 16
    # blocks held by a running sequence are never evicted
    held = SeqPrefix([*words(32, "b"), "u"], seed=1)
    assert cache.admit(held, 33, free_blocks=100) == 32
    cache.fit(0)
    assert cache.contains(b.hashes[0]) and cache.contains(b.hashes[1])


def test_engine_prefills_only_uncached_tokens() -> None:
    rec = Steps()
    engine = Engine(PROFILE, rec)
    system = words(256, "sys")
    first = submit(engine, rec, system + words(10, "u1"))
    t = run_steps(engine, 0.0, 3)
    assert first.state == FINISHED and rec.prefill == [266]
    second = submit(engine, rec, system + words(10, "u2"))
    dt = engine.schedule(t)
    assert rec.prefill[-1] == 10  # the 256-token system prompt came from the cache
    assert dt is not None and abs(dt - (0.01 + 0.001 * 10)) < 1e-12
    cache = engine.prefix_cache
    assert cache is not None and cache.hits == 256 and cache.queries == 266 * 2
    engine.complete_step(t + dt)
    assert second.state == FINISHED


def test_next_turn_hits_the_blocks_its_answer_filled() -> None:
    rec = Steps()
    engine = Engine(PROFILE, rec)
    turn1 = words(30, "p")
    s1 = submit(engine, rec, turn1, out=40)
    run_steps(engine, 0.0, 50)
    assert s1.state == FINISHED
    sp = s1.prefix
    assert sp is not None
    answer = [sp.token(30 + i) for i in range(40)]  # the words the client received
    s2 = submit(engine, rec, turn1 + answer + words(5, "n"))
    engine.schedule(1.0)
    # 69 tokens of the first sequence had KV (the last generated token never does): 4 full blocks
    assert s2.computed == 64 and rec.prefill[-1] == 75 - 64


def test_disabled_cache_prefills_everything() -> None:
    rec = Steps()
    engine = Engine(PROFILE, rec, prefix_caching=False)
    for _ in range(2):
        s = Seq(64, 1, max_tokens=1, seed=1, sink=rec, arrival=0.0)
        engine.add(s)
        run_steps(engine, 0.0, 2)
    assert engine.prefix_cache is None and rec.prefill == [64, 64]


async def test_metrics_export_queries_hits_and_cache_config() -> None:
    prompt = " ".join(f"w{i}" for i in range(100))
    async with run_simulator(SimConfig(port=0, model=["m"])) as s:
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="x")
        for _ in range(2):
            await client.chat.completions.create(model="m", max_tokens=1,
                                                 messages=[{"role": "user", "content": prompt}])
        await client.close()
        text = await scrape(s)
    assert metric(text, "vllm:prefix_cache_queries_total", model_name="m", engine="0") == 200
    assert metric(text, "vllm:prefix_cache_hits_total", model_name="m") == 96  # 6 of 6.25 blocks
    blocks = s.engine.total_blocks
    assert (f'vllm:cache_config_info{{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
            f'engine="0",gpu_memory_utilization="0.9",num_gpu_blocks="{blocks}"}} 1.0') in text


async def test_legacy_metrics_export_the_hit_rate_gauge() -> None:
    prompt = " ".join(f"w{i}" for i in range(100))
    async with run_simulator(SimConfig(port=0, legacy_metrics=True)) as s:
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="x")
        for _ in range(2):
            await client.completions.create(model="sim-model", max_tokens=1, prompt=prompt)
        await client.close()
        text = await scrape(s)
    assert metric(text, "vllm:gpu_prefix_cache_hit_rate") == 96 / 200
    assert "vllm:prefix_cache_hits" not in text


def test_hits_count_the_requests_tokens_and_prefill_the_profiles_scaled_prompt() -> None:
    scaled = Profile(name="s", base_s=0.01, per_seq_s=0.0, per_prefill_token_s=0.001, per_context_token_s=0.0,
                     max_num_seqs=8, max_num_batched_tokens=4096, kv_cache_tokens=16 * 64, block_size=BS,
                     prompt_scale=0.5)
    rec = Steps()
    engine = Engine(scaled, rec)
    system = words(256, "sys")
    submit(engine, rec, system + words(10, "a"))
    t = run_steps(engine, 0.0, 3)
    assert rec.prefill == [133]  # the engine computes 266 tokens as 133
    submit(engine, rec, system + words(10, "b"))
    engine.schedule(t)
    cache = engine.prefix_cache
    assert cache is not None and cache.hits == 256  # the cache counts the request's own tokens
    assert rec.prefill[-1] == 133 - 256 * 133 // 266  # the uncached 10 of 266, scaled: 5
