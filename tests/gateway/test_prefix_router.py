"""The cache-aware router as pure code: prompt keys, affinity, the saturation guard, cold placement
agreeing across independent workers, retirement (no sockets, no clock)."""

from __future__ import annotations

import json

from gateway.backend import Backend
from gateway.prefix_router import PrefixRouter
from gateway.upstream_client import UpstreamPool
from hpcgate.metrics_text import EngineLoad

NOW = 100.0
STALE = 3.0


class _NoLoop:
    """Pools are never used here; their constructor only stores the loop."""


def backends(n: int, queue: float = 0.0) -> tuple[Backend, ...]:
    out = []
    for i in range(n):
        pool = UpstreamPool(f"n{i}", 8000, loop=_NoLoop(), max_idle=1, connect_timeout=1,  # type: ignore[arg-type]
                            read_timeout=1)
        b = Backend(f"http://n{i}:8000", f"n{i}", 8000, None, pool)
        b.record_load(EngineLoad(queue, 0.0, 0.1, kv_capacity_tokens=100_000), NOW)
        out.append(b)
    return tuple(out)


def messages(*turns: str, system: str = "You are a helpful assistant. " * 40) -> bytes:
    msgs = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return json.dumps(msgs).encode()


def conversation(n: int, system: str | None = None) -> list[bytes]:
    """The messages of each turn of conversation n: every turn resends the whole history."""
    turns: list[str] = []
    out = []
    for t in range(4):
        turns.append(f"conversation {n} question {t}: " + "tell me more " * 60)
        out.append(messages(*turns) if system is None else messages(*turns, system=system))
        turns.append("an answer " * 80)
    return out


def route(router: PrefixRouter, bs: tuple[Backend, ...], raw: bytes, tenant: int = 1,
          session: bytes | None = None) -> Backend:
    key = router.key(raw, "m", tenant, session)
    b = router.choose(bs, key, NOW, stale_after=STALE)
    assert b is not None
    router.record(b, key, NOW)  # the proxy records the prompt on the backend it sends it to
    return b


def test_key_names_full_blocks_chained_and_seeded_by_model_and_tenant() -> None:
    r = PrefixRouter(block_bytes=64)
    raw = messages("hello " * 50)
    k = r.key(raw, "m", 1)
    assert len(k.blocks) == len(raw) // 64 and k.tokens == len(raw) // 4
    longer = r.key(raw + b"x" * 200, "m", 1)
    assert longer.blocks[:len(k.blocks)] == k.blocks  # same prefix, same names
    changed = r.key(b"!" + raw[1:], "m", 1)
    assert all(a != b for a, b in zip(changed.blocks, k.blocks, strict=False))  # chained from block 0
    assert r.key(raw, "m", 2).blocks[0] != k.blocks[0]  # tenants never share
    assert r.key(raw, "other", 1).blocks[0] != k.blocks[0]
    assert PrefixRouter(block_bytes=64).key(raw, "m", 1).blocks == k.blocks  # stable across workers


def test_a_conversation_returns_to_its_instance() -> None:
    r = PrefixRouter()
    bs = backends(4)
    for n in range(8):
        turns = conversation(n)
        first = route(r, bs, turns[0])
        for raw in turns[1:]:
            assert route(r, bs, raw) is first
    assert r.hit_tokens > 0.5 * r.query_tokens / 2


def test_load_outweighs_a_small_cached_prefix_but_not_a_large_one() -> None:
    r = PrefixRouter(max_imbalance=1000)
    bs = backends(2)
    short = messages("q", system="s" * 600)
    home = route(r, bs, short)
    other = bs[1] if home is bs[0] else bs[0]
    home.queue = 12.0  # its queue is deep now; the cached prefix is only ~150 tokens
    assert route(r, bs, short[:-2] + b', {"role":"user","content":"next"}]') is other
    home.queue = 0.0
    r2 = PrefixRouter(max_imbalance=1000)
    for n in range(30):  # typical traffic: short prompts, ~100 uncached tokens each
        route(r2, bs, messages(f"typical {n}", system="t" * 400))
    big = messages("q", system="s" * 40_000)  # ~10k cached tokens are worth waiting behind 8 requests
    home2 = route(r2, bs, big)
    home2.queue, (bs[1] if home2 is bs[0] else bs[0]).queue = 8.0, 0.0
    assert route(r2, bs, big[:-2] + b', {"role":"user","content":"next"}]') is home2


def test_saturated_instance_is_skipped_whatever_it_holds() -> None:
    r = PrefixRouter(max_imbalance=8)
    bs = backends(3)
    raw = conversation(1)
    home = route(r, bs, raw[0])
    home.kv_usage = 0.99  # KV cache nearly full
    assert route(r, bs, raw[1]) is not home
    home.kv_usage, home.queue = 0.2, 30.0  # deep queue while a peer is idle
    assert route(r, bs, raw[2]) is not home
    for b in bs:
        b.queue, b.kv_usage = 30.0, 0.99  # every one saturated: still routed, never refused
    assert route(r, bs, raw[3]) in bs


def test_cold_placement_agrees_across_independent_workers() -> None:
    a, b = PrefixRouter(), PrefixRouter()  # two workers (or replicas): no shared state
    bs_a, bs_b = backends(4), backends(4)  # each its own Backend objects for the same URLs
    placed = set()
    for n in range(32):
        raw = conversation(n, system=f"user {n}'s own instructions")[0]
        ca, cb = route(a, bs_a, raw, session=None), route(b, bs_b, raw)
        assert ca.url == cb.url
        placed.add(ca.url)
        ca.since_scrape = cb.since_scrape = 0  # keep the loads equal between the two
    assert len(placed) == 4  # first blocks spread conversations over every instance


def test_session_header_places_conversations_sharing_a_system_prompt() -> None:
    bs = backends(4)
    system = "the shared system prompt of a RAG application " * 30
    with_session, without = set(), set()
    for n in range(16):  # each a cold start on a fresh worker: nothing known anywhere
        raw = messages(f"q{n}", system=system)
        b = route(PrefixRouter(), bs, raw, session=b"chat-%d" % n)
        assert route(PrefixRouter(), bs, raw, session=b"chat-%d" % n) is b  # agreed across workers
        with_session.add(b.url)
        without.add(route(PrefixRouter(), bs, raw).url)
    assert len(with_session) > 1  # the session id, not the shared first block, places them
    assert len(without) == 1  # the first block alone sends them all to one instance


def test_restart_ejection_and_leaving_retire_the_view() -> None:
    r = PrefixRouter(cold_slack=0.5)
    bs = backends(2)
    raw = conversation(7)
    home = route(r, bs, raw[0])
    assert r.blocks(home) > 0
    home.record_load(EngineLoad(0.0, 0.0, 0.1, prefix_queries=500.0), NOW)
    assert r.blocks(home) > 0
    home.record_load(EngineLoad(0.0, 0.0, 0.1, prefix_queries=10.0), NOW)  # counter went down: restart
    assert r.blocks(home) == 0
    route(r, bs, raw[1])
    chosen = route(r, bs, raw[2])
    assert r.blocks(chosen) > 0
    for _ in range(5):
        chosen.record_failure(NOW, threshold=5, base_s=5.0)  # ejected
    assert r.blocks(chosen) == 0
    route(r, bs, raw[3])
    r.keep([])  # left the table (removed or draining)
    assert all(r.blocks(b) == 0 for b in bs)


def test_index_is_sized_from_the_kv_capacity() -> None:
    r = PrefixRouter(block_bytes=512)
    (b,) = backends(1)
    b.kv_capacity = 128 * 10  # 10 blocks of 128 estimated tokens
    for n in range(5):
        route(r, (b,), conversation(n)[3])
    assert r.blocks(b) == 10 and r.evictions > 0


def test_excluded_and_capped_backends() -> None:
    r = PrefixRouter()
    bs = backends(2)
    key = r.key(messages("q"), "m", 1)
    assert r.choose(bs, key, NOW, stale_after=STALE, exclude=bs) is None
    for b in bs:
        b.inflight = 4
    assert r.choose(bs, key, NOW, stale_after=STALE, max_inflight=4) is None


def test_queued_prefill_is_worked_off_at_the_assumed_rate() -> None:
    r = PrefixRouter(prefill_tokens_per_s=20_000)
    bs = backends(2)
    group = messages("q", system="a shared prefix of a group " * 200)  # ~1,400 estimated tokens
    home = route(r, bs, group)
    cold = r.key(messages("x", system="another group's long prompt " * 1500), "m", 1)  # ~10k tokens
    home.prefill_inflight = r.record(home, cold, NOW)  # in flight on home, as the proxy keeps it
    member = r.key(group[:-2] + b', {"role":"user","content":"next"}]', "m", 1)
    # right after: home must first prefill 10k tokens, more than recomputing the group elsewhere
    assert r.choose(bs, member, NOW + 0.01, stale_after=STALE) is not home
    # a second later, ~12k tokens at 20k/s are worked off although the request still decodes
    assert r.choose(bs, member, NOW + 1.0, stale_after=STALE) is home


def test_own_finished_requests_are_not_load_and_other_workers_are() -> None:
    r = PrefixRouter()
    bs = backends(2)
    raw = conversation(3)
    home = route(r, bs, raw[0])
    home.inflight = 12
    home.record_load(EngineLoad(12.0, 0.0, 0.1), NOW)  # the scrape saw this worker's 12 requests
    home.inflight = 0  # which have all finished since
    assert route(r, bs, raw[1]) is home
    home.record_load(EngineLoad(40.0, 0.0, 0.1), NOW)  # 40 requests of other workers or replicas
    assert route(r, bs, raw[2]) is not home
