"""Tenant limits: concurrency and tokens per minute, reserved at admission, leased cluster-wide.

Pure bookkeeping (no I/O, the clock is passed in); :mod:`gateway.lease_sync` moves budget
between this worker and Redis in the background, so a request never waits on Redis.

Reservation. A request is admitted only if its tenant's balance covers an *estimate* of its
tokens (:func:`estimate_tokens`: the prompt's JSON size / 4, plus ``max_tokens`` or, without
one, ``tpm_completion_estimate``); the estimate is taken from the balance at once and replaced
by the engine's real count when the request ends (:meth:`TenantLimiter.leave`). A burst of long
requests is thus refused up front instead of being charged after it ran. An estimate larger
than the whole budget is clamped to it, so such a request is admitted when the balance is full.

Overdraw bound. The balance can go below zero only by what the estimates missed:
``sum over requests in flight of max(0, real - estimate)``. With ``max_tokens`` set the
completion never exceeds its estimate, so the miss is the prompt's (at most 3/4 of its JSON
bytes, as a token is at least one byte); without it, at most the model's context length per
request. A negative balance refuses every request until the refill (or the next lease) covers
it, so over any window longer than a minute the tenant spends its limit, plus that bound once.

Modes per tenant and worker:
- *local*: a token bucket refilling at ``share / 60`` per second with capacity ``share`` and
  ``share`` concurrent slots, where share = ceil(limit / holders): the worker's own processes in
  static mode, or (fallback, Redis down past ``lease_hold_s``) every holder last seen in Redis.
- *leased*: no local refill; the balance and the slots are what the lease sync granted from the
  cluster-wide bucket and slot table in Redis. Spending beyond the lease is impossible but for
  the overdraw above; the sync books it against the cluster bucket.
A tenant first seen by a worker starts with a provisional local share until the next sync (at
most ``lease_interval_s``): ``floor(limit / holders)`` slots, so the sum of the slots never
exceeds the limit (a limit below the holder count refuses a tenant's first request at a new
worker with Retry-After 1, and that refusal asks the next lease for a slot), and
``ceil(tpm / holders)`` tokens; what it spends of those is booked in Redis at the next sync, as
is anything spent in fallback, so the cluster bucket is charged for every token.
"""

from __future__ import annotations

import math

from gateway.auth import Principal
from gateway.errors import ApiError

LimitKey = int | str  # a tenant id, or "<tenant id>/<model>" for a tenant's limits on one model
PROMPT_BYTES_PER_TOKEN = 4  # the usual BPE average for English text and JSON


def estimate_tokens(payload_bytes: int, max_tokens: int | None, default_completion: int,
                    context_len: int | None = None) -> int:
    """Tokens a request is expected to use: prompt from its size, completion from its cap."""
    prompt = payload_bytes // PROMPT_BYTES_PER_TOKEN + 1
    completion = max_tokens if max_tokens is not None and max_tokens >= 0 else default_completion
    if context_len is not None:
        completion = min(completion, max(0, context_len - prompt))
    return prompt + completion


class TenantState:
    """One tenant's budget in this worker."""

    __slots__ = ("active", "capacity", "conc_limit", "debt", "demand", "last_used", "leased", "rate",
                 "refused", "slots", "tokens", "tpm_limit", "updated")

    def __init__(self, tpm: int | None, max_concurrent: int | None, holders: int, now: float) -> None:
        self.tpm_limit = tpm
        self.conc_limit = max_concurrent
        self.active = 0
        self.leased = False
        self.demand = 0.0  # tokens reserved or refused since the last sync (the lease's sizing)
        self.refused = 0  # requests refused for want of a slot since the last sync
        self.last_used = now
        self.updated = now
        self.capacity = 0.0
        self.rate = 0.0
        self.slots = 0
        self.tokens = 0.0
        self.local_share(holders, now)
        self.debt = 0.0  # net tokens spent in local mode that Redis has not booked yet

    def local_share(self, holders: int, now: float) -> None:
        """Switch to (or stay in) local mode with a 1/holders share of each limit."""
        self.leased = False
        if self.tpm_limit is not None:
            share = float(math.ceil(self.tpm_limit / holders))
            if self.capacity != share:
                self.tokens = min(self.tokens, share) if self.capacity else share
            self.capacity, self.rate = share, share / 60.0
        if self.conc_limit is not None:
            self.slots = math.ceil(self.conc_limit / holders)
        self.updated = now

    def refill(self, now: float) -> None:
        if self.rate:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now


class Reservation:
    __slots__ = ("reserved", "state")

    def __init__(self, state: TenantState, reserved: float) -> None:
        self.state = state
        self.reserved = reserved


class TenantLimiter:
    """The tenants' states in one worker; ``holders`` is how many processes share each limit."""

    __slots__ = ("holders", "leasing", "states")

    def __init__(self, holders: int) -> None:
        self.holders = holders
        self.leasing = False  # leases are flowing: a new tenant's provisional slots round down
        self.states: dict[LimitKey, TenantState] = {}

    def enter(self, p: Principal, now: float, estimate: int) -> Reservation | None:
        """Admit a request of ``p`` expected to use ``estimate`` tokens, or raise 429."""
        if p.max_concurrent is None and p.tpm is None:
            return None
        return self.enter_key(p.tenant_id, p.tpm, p.max_concurrent, now, estimate=estimate)

    def enter_key(self, key: LimitKey, tpm: int | None, conc: int | None, now: float, *, estimate: int,
                  scope: str = "this tenant") -> Reservation:
        """:meth:`enter` for the limits held under ``key`` (a tenant, or a tenant's model)."""
        state = self.states.get(key)
        if state is None or state.tpm_limit != tpm or state.conc_limit != conc:
            state = self._new_state(key, tpm, conc, now, state)
        state.last_used = now
        if conc is not None and state.active >= state.slots:
            state.refused += 1
            raise ApiError(429, f"too many concurrent requests for {scope}", "concurrency_limit_exceeded",
                           retry_after=1)
        reserved = 0.0
        if tpm is not None:
            state.refill(now)
            reserved = float(min(estimate, tpm))
            state.demand += reserved
            if state.tokens < reserved:
                rate = state.rate or tpm / 60.0  # leased: the cluster bucket's refill
                wait = math.ceil((reserved - state.tokens) / rate)
                raise ApiError(429, f"tokens-per-minute limit exceeded for {scope}", "rate_limit_exceeded",
                               retry_after=max(1, min(wait, 60)))
            state.tokens -= reserved
            if not state.leased:
                state.debt += reserved
        state.active += 1
        return Reservation(state, reserved)

    def _new_state(self, key: LimitKey, tpm: int | None, conc: int | None, now: float,
                   old: TenantState | None) -> TenantState:
        if old is None:
            state = self.states[key] = TenantState(tpm, conc, self.holders, now)
            if self.leasing and conc is not None:
                state.slots = conc // self.holders  # 0: refused until the next lease
            return state
        # The limits changed: the same state (requests in flight settle into it), a local share
        # of the new limits until the next lease (a lease held is dropped: conservative).
        old.tpm_limit, old.conc_limit = tpm, conc
        old.local_share(self.holders, now)
        return old

    @staticmethod
    def leave(res: Reservation | None, tokens: int) -> None:
        """The request ended having used ``tokens``: settle its reservation."""
        if res is not None:
            state = res.state
            state.active -= 1
            if state.tpm_limit is not None:
                state.tokens += res.reserved - tokens
                if not state.leased:
                    state.debt += tokens - res.reserved
                state.demand += max(0.0, tokens - res.reserved)


# -- leases (the sync's pure part) ------------------------------------------------------------------
class LeaseAsk:
    """What one tenant's state asks of the cluster in one sync."""

    __slots__ = ("conc_limit", "conc_want", "debt", "tenant_id", "tpm_limit", "tpm_want")

    def __init__(self, tenant_id: LimitKey, *, tpm_limit: int, tpm_want: float, debt: float, conc_limit: int,
                 conc_want: int) -> None:
        self.tenant_id = tenant_id
        self.tpm_limit = tpm_limit  # 0: no TPM limit
        self.tpm_want = tpm_want  # tokens to withdraw (> 0) or return (< 0)
        self.debt = debt  # tokens already spent locally that Redis has not booked
        self.conc_limit = conc_limit  # 0: no concurrency limit
        self.conc_want = conc_want  # slots to hold after this sync


def plan_leases(lim: TenantLimiter, now: float, idle_s: float) -> list[LeaseAsk]:
    """One ask per tenant held; tenants idle for ``idle_s`` ask to return everything and are dropped.

    Target balance: twice the demand of the last interval, and at least a 1/holders share of
    the limit (so an idle worker can admit a tenant's next request at once; the cluster bucket's
    refill goes to whoever spends). Slots: those in use, one spare if any request came or was
    refused, plus the refused ones; an idle worker holds none, so slots flow to busy workers.
    """
    asks: list[LeaseAsk] = []
    gone: list[LimitKey] = []
    for tid, st in lim.states.items():
        idle = now - st.last_used > idle_s and st.active == 0
        busy = st.demand > 0 or st.refused > 0 or now - st.last_used < 1.0
        tpm_want = 0.0
        if st.tpm_limit is not None:
            floor = math.ceil(st.tpm_limit / lim.holders)
            target = 0.0 if idle else min(float(st.tpm_limit), max(2.0 * st.demand, float(floor)))
            have = st.tokens if st.leased else 0.0  # a local bucket is dropped: its spend is the debt
            tpm_want = target - have
        conc_want = 0
        if st.conc_limit is not None:
            conc_want = 0 if idle else st.active + (1 if busy else 0) + st.refused
        asks.append(LeaseAsk(tid, tpm_limit=st.tpm_limit or 0, tpm_want=tpm_want, debt=st.debt,
                             conc_limit=st.conc_limit or 0, conc_want=conc_want))
        if idle:
            gone.append(tid)
    for tid in gone:
        del lim.states[tid]
    return asks


def apply_grant(lim: TenantLimiter, ask: LeaseAsk, tpm_grant: float, slots: int, now: float) -> None:
    """Install what Redis granted for ``ask`` (``tpm_grant``: tokens added, negative if returned)."""
    st = lim.states.get(ask.tenant_id)
    if st is None:
        return  # dropped as idle: everything was returned
    st.debt -= ask.debt
    if st.tpm_limit is not None:
        # A local bucket is dropped: what was spent from it is in the debt.
        st.tokens = (st.tokens if st.leased else 0.0) + tpm_grant
    if st.conc_limit is not None:
        st.slots = slots
    st.leased = True
    st.rate = 0.0
    st.capacity = float(st.tpm_limit or 0)
    st.demand = 0.0
    st.refused = 0
    st.updated = now


def fall_back(lim: TenantLimiter, holders: int, now: float) -> None:
    """Redis has been out of reach past the hold time: every tenant to a ceil(1/holders) local
    share (also those first seen meanwhile with rounded-down slots: no lease will come for them)."""
    lim.holders = max(1, holders)
    lim.leasing = False
    for st in lim.states.values():
        st.local_share(lim.holders, now)
