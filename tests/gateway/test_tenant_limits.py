"""Tenant limits: reservation and reconciliation of TPM, concurrency, leases (pure, then with Redis)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.auth import Principal
from gateway.errors import ApiError
from gateway.lease_sync import LEASE_SCRIPT, LeaseSync
from gateway.request_view import parse_view
from gateway.tenant_admission import TenantAdmission
from gateway.tenant_limits import TenantLimiter, apply_grant, estimate_tokens, fall_back, plan_leases
from hpcgate.schemas import ModelLimit


def tenant(tpm: int | None = None, conc: int | None = None, tid: int = 1) -> Principal:
    return Principal(tid, "t", None, max_concurrent=conc, tpm=tpm, expires_at=None)


def refused(lim: TenantLimiter, p: Principal, now: float, estimate: int) -> ApiError:
    with pytest.raises(ApiError) as err:
        lim.enter(p, now, estimate)
    assert err.value.status == 429
    return err.value


def test_estimate_from_prompt_size_and_cap() -> None:
    assert estimate_tokens(400, 50, 1024) == 101 + 50
    assert estimate_tokens(400, None, 1024) == 101 + 1024  # no max_tokens: the configured default
    assert estimate_tokens(400, None, 1024, context_len=300) == 300  # never past the context
    assert estimate_tokens(0, 0, 1024) == 1


def test_the_estimate_reads_the_body_view() -> None:
    v = parse_view("completions", b'{"model":"m","prompt":"abcdefgh","max_tokens":10,"n":3}')
    assert (v.payload_bytes(), v.completion_cap()) == (10, 30)  # the JSON string; 3 choices of 10
    v = parse_view("responses", b'{"model":"m","input":"x","max_output_tokens":7}')
    assert v.completion_cap() == 7
    v = parse_view("rerank", b'{"model":"m","query":"q","documents":["a","b"]}')
    assert (v.payload_bytes(), v.completion_cap()) == (3 + 9, None)


def test_tpm_reserves_at_start_and_reconciles_at_end() -> None:
    lim = TenantLimiter(holders=1)
    p = tenant(tpm=1000)
    first = lim.enter(p, 0.0, 600)
    assert first is not None and lim.states[1].tokens == 400
    # A burst of long requests is refused up front, while the first one still runs.
    err = refused(lim, p, 0.0, 600)
    assert err.code == "rate_limit_exceeded" and err.retry_after == 12  # 200 missing at 1000/60 per s
    small = lim.enter(p, 0.0, 300)
    TenantLimiter.leave(first, 100)  # it used far less than reserved: the rest comes back
    assert lim.states[1].tokens == pytest.approx(600)
    TenantLimiter.leave(small, 350)  # 50 over its estimate: that is the overdraw, nothing more
    assert lim.states[1].tokens == pytest.approx(550)


def test_overdraw_is_bounded_by_what_estimates_missed() -> None:
    lim = TenantLimiter(holders=1)
    p = tenant(tpm=1000)
    held = [lim.enter(p, 0.0, 100) for _ in range(10)]  # 10 x 100 reserved: the bucket is empty
    refused(lim, p, 0.0, 1)
    for r in held:
        TenantLimiter.leave(r, 130)  # each missed by 30
    assert lim.states[1].tokens == pytest.approx(-300)  # = sum(real - estimate), the stated bound
    err = refused(lim, p, 1.0, 1)  # a negative balance refuses until the refill covers it
    assert err.retry_after == 18
    assert lim.enter(p, 20.0, 1) is not None


def test_estimate_over_the_whole_budget_is_clamped() -> None:
    lim = TenantLimiter(holders=1)
    p = tenant(tpm=100)
    r = lim.enter(p, 0.0, 10_000)  # larger than the limit: admitted on a full bucket
    assert r is not None and r.reserved == 100
    refused(lim, p, 0.0, 1)


def test_concurrency_and_local_share_per_holder() -> None:
    lim = TenantLimiter(holders=2)
    p = tenant(conc=3)
    a = lim.enter(p, 0.0, 10)
    lim.enter(p, 0.0, 10)  # ceil(3 / 2) = 2 slots in this worker
    assert refused(lim, p, 0.0, 10).code == "concurrency_limit_exceeded"
    TenantLimiter.leave(a, 5)
    assert lim.enter(p, 0.0, 10) is not None


def test_limits_changed_keep_requests_in_flight() -> None:
    lim = TenantLimiter(holders=1)
    r = lim.enter(tenant(conc=2, tpm=1000), 0.0, 10)
    assert r is not None
    assert refused(lim, tenant(conc=1, tpm=1000), 0.0, 10).code == "concurrency_limit_exceeded"
    TenantLimiter.leave(r, 10)
    assert lim.enter(tenant(conc=1, tpm=1000), 0.0, 10) is not None


def test_lease_plan_and_grant() -> None:
    lim = TenantLimiter(holders=4)
    p = tenant(tpm=1200, conc=4)
    r = lim.enter(p, 0.0, 100)  # provisional local share: 300 tokens, 1 slot
    assert r is not None
    (ask,) = plan_leases(lim, 0.5, idle_s=60)
    assert ask.debt == 100  # spent locally: booked in Redis with the first lease
    assert ask.tpm_want == 300  # at least a 1/holders share (2 x demand is less)
    assert ask.conc_want == 2  # one in flight + one spare
    apply_grant(lim, ask, 300.0, 2, 0.6)
    st = lim.states[1]
    assert st.leased and st.tokens == 300 and st.slots == 2 and st.debt == 0
    TenantLimiter.leave(r, 40)  # settled into the lease
    assert st.tokens == 360 and st.debt == 0
    (ask,) = plan_leases(lim, 100.0, idle_s=60)  # idle: everything goes back, the state is dropped
    assert ask.tpm_want == -360 and ask.conc_want == 0 and not lim.states


def test_fallback_gives_local_shares() -> None:
    lim = TenantLimiter(holders=1)
    p = tenant(tpm=600, conc=4)
    lim.enter(p, 0.0, 1)
    (ask,) = plan_leases(lim, 0.1, idle_s=60)
    apply_grant(lim, ask, 50.0, 1, 0.1)
    lim.leasing = True
    lim.holders = 4
    with pytest.raises(ApiError):
        lim.enter(tenant(conc=1, tid=2), 1.0, 1)  # first seen while leasing: 1 // 4 slots until a lease
    fall_back(lim, 2, 1.0)
    st = lim.states[1]
    assert not st.leased and st.slots == 2 and st.capacity == 300 and st.rate == 5.0
    assert lim.enter(tenant(conc=1, tid=2), 1.0, 1) is not None  # no lease will come: a local share


# -- the lease script on the real Redis ---------------------------------------------------------
async def test_two_holders_share_one_budget(redis_url: str, redis_prefix: str) -> None:
    prefix = f"{redis_prefix}lease2:"
    client = aioredis.from_url(redis_url)
    loop = asyncio.get_running_loop()
    try:
        script = client.register_script(LEASE_SCRIPT)
        a, b = TenantLimiter(holders=1), TenantLimiter(holders=1)
        sa = LeaseSync(redis_url, prefix, a, loop, interval_s=0.1, hold_s=5)
        sb = LeaseSync(redis_url, prefix, b, loop, interval_s=0.1, hold_s=5)
        await sa.sync_once(script)
        await sb.sync_once(script)
        assert a.holders == 1 and b.holders == 2
        p = tenant(tpm=600, conc=2)
        ra = a.enter(p, loop.time(), 10)
        rb = b.enter(p, loop.time(), 10)
        await sa.sync_once(script)
        await sb.sync_once(script)
        sta, stb = a.states[1], b.states[1]
        assert sta.leased and stb.leased and sta.slots + stb.slots <= 2
        # Tokens: what both hold, what Redis holds and what they spent add up to the limit.
        bucket = float(await client.hget(f"{prefix}lease:tpm:1", "tokens") or 0)
        assert sta.tokens + stb.tokens + bucket + 20 == pytest.approx(600, abs=2)
        await sa.sync_once(script)  # a returns what it holds beyond its share; b gets a slot
        await sb.sync_once(script)
        assert (sta.slots, stb.slots) == (1, 1)  # each holds its request, never more than the limit
        assert refused(a, p, loop.time(), 1).code == "concurrency_limit_exceeded"
        assert refused(b, p, loop.time(), 1).code == "concurrency_limit_exceeded"
        assert stb.tokens > 0
        bucket = float(await client.hget(f"{prefix}lease:tpm:1", "tokens") or 0)
        assert sta.tokens + stb.tokens + bucket + 20 == pytest.approx(600, abs=2)
        TenantLimiter.leave(ra, 10)
        TenantLimiter.leave(rb, 10)
        held = sta.tokens
        before = float(await client.hget(f"{prefix}lease:tpm:1", "tokens") or 0)
        assert await sa.release()  # shutdown: a's slot and tokens go back at once
        assert sa.holder.encode() not in await client.hgetall(f"{prefix}lease:conc:1") and not a.states
        after = float(await client.hget(f"{prefix}lease:tpm:1", "tokens") or 0)
        assert after == pytest.approx(min(600, before + held), abs=2)
    finally:
        keys = await client.keys(f"{prefix}*")
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_redis_down_keeps_lease_then_falls_back(redis_url: str, redis_prefix: str) -> None:
    loop = asyncio.get_running_loop()
    lim = TenantLimiter(holders=1)
    prefix = f"{redis_prefix}leasedown:"
    good = aioredis.from_url(redis_url)
    bad = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        sync = LeaseSync(redis_url, prefix, lim, loop, interval_s=0.1, hold_s=0.3)
        lim.enter(tenant(tpm=600, conc=4), loop.time(), 1)
        assert await sync.sync_once(good.register_script(LEASE_SCRIPT))
        st = lim.states[1]
        assert st.leased
        down = bad.register_script(LEASE_SCRIPT)
        assert not await sync.sync_once(down)
        assert st.leased  # within the hold time the lease stays
        sync.last_ok -= 1.0  # the hold time has passed
        assert not await sync.sync_once(down)
        assert not st.leased and st.slots == 4 and st.capacity == 600  # one holder seen: the whole limit
    finally:
        keys = await good.keys(f"{prefix}*")
        if keys:
            await good.delete(*keys)
        await good.aclose()
        await bad.aclose()


# -- per-model limits and the monthly quota ---------------------------------------------------------
def test_quota_reserves_settles_and_survives_a_load() -> None:
    adm = TenantAdmission(TenantLimiter(holders=1))
    p = Principal(1, "t", None, max_concurrent=None, tpm=None, expires_at=None, monthly_quota=1000)
    adm.quotas.load({1: 700}, {})
    a = adm.admit(p, "m", 0.0, 200)
    with pytest.raises(ApiError) as err:
        adm.admit(p, "m", 0.0, 101)  # 700 + 200 reserved + 101 > 1000
    assert err.value.code == "insufficient_quota" and "100 of 1000 tokens left" in err.value.message
    adm.quotas.load({1: 750}, {1: 30})  # a fresh read: in flight (200) and unflushed (30) stay counted
    assert adm.quotas.spent[1] == 230
    a.leave(150)  # the request used 150 of its 200
    assert adm.quotas.spent[1] == 180 and not adm.quotas.in_flight
    assert adm.admit(p, "m", 0.0, 70) is not None  # 750 + 180 + 70 = 1000


def test_refused_by_the_model_limit_gives_the_tenant_budget_back() -> None:
    lim = TenantLimiter(holders=1)
    adm = TenantAdmission(lim)
    p = Principal(1, "t", None, max_concurrent=5, tpm=1000, expires_at=None,
                  model_limits={"big": ModelLimit(tokens_per_minute=100)})
    assert adm.admit(p, "small", 0.0, 300) is not None  # no limit of its own on "small"
    with pytest.raises(ApiError) as err:
        adm.admit(p, "big", 0.0, 300)  # clamped to big's 100: admitted on a full bucket
        adm.admit(p, "big", 0.0, 50)
    assert "on model 'big'" in err.value.message
    st = lim.states[1]
    assert st.active == 2 and st.tokens == pytest.approx(1000 - 300 - 300)  # the refused one gave back its 50
