"""Cluster-wide tenant limits: a background loop that leases budget from Redis for this worker.

Every ``lease_interval_s`` the worker sends one script call to Redis (never one per request):
for each tenant it holds, it books the tokens it spent in local mode (``debt``), withdraws
tokens from or returns them to the tenant's cluster-wide token bucket (capacity and refill
per minute = the tenant's TPM limit, refilled with Redis's clock), and claims the concurrency
slots it needs from the tenant's slot table (each holder's claim expires after
``lease_hold_s`` unless renewed, so a dead worker's slots come back). The sum of the slots
granted never exceeds the limit; the bucket can go below zero only by the overdraw stated in
:mod:`gateway.tenant_limits`, and every holder then waits for the refill.

Redis down: the worker keeps spending its last lease (nothing is refilled, so it cannot spend
more than it was granted) for ``lease_hold_s``, then every tenant falls back to a local share
of ``limit / holders`` (the holders Redis last reported), refilled locally, until Redis
answers again; what was spent in the meantime is booked then. Error bound while Redis is
down: at most one limit per hold time from the leases, then the holders' shares add up to
the limit again (exactly if the holder count has not changed).
"""

from __future__ import annotations

import asyncio
import secrets

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.tenant_limits import TenantLimiter, apply_grant, fall_back, plan_leases
from hpcgate.logs import get_logger

log = get_logger("hpcgate.gateway.leases")

# ARGV: prefix, holder id, hold s, n, then per tenant: id, tpm, tpm_want, debt, conc limit,
# conc want, active. Returns the live holder count, then per tenant: tokens granted (negative:
# returned), slots granted (as strings: Lua numbers would be truncated to integers).
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local prefix, me, hold, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local hk = prefix .. 'lease:holders'
redis.call('ZADD', hk, now, me)
redis.call('ZREMRANGEBYSCORE', hk, '-inf', now - hold)
redis.call('EXPIRE', hk, math.ceil(hold) + 1)
local out = {tostring(redis.call('ZCARD', hk))}
for i = 0, n - 1 do
  local b = 5 + i * 7
  local tid = ARGV[b]
  local tpm, want, debt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local climit, cwant, active = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6])
  local grant = 0
  if tpm > 0 then
    local k = prefix .. 'lease:tpm:' .. tid
    local v = redis.call('HMGET', k, 'tokens', 'ts')
    local tokens = tonumber(v[1]) or tpm
    local ts = tonumber(v[2]) or now
    tokens = math.min(tpm, tokens + math.max(0, now - ts) * tpm / 60) - debt
    if want < 0 then
      grant = want
      tokens = math.min(tpm, tokens - want)
    else
      grant = math.max(0, math.min(want, tokens))
      tokens = tokens - grant
    end
    redis.call('HSET', k, 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', now))
    redis.call('EXPIRE', k, 120)
  end
  local slots = 0
  if climit > 0 then
    local k = prefix .. 'lease:conc:' .. tid
    local all = redis.call('HGETALL', k)
    local others = 0
    for j = 1, #all, 2 do
      if all[j] ~= me then
        local s, e = string.match(all[j + 1], '^(%d+):(.+)$')
        if tonumber(e) < now then redis.call('HDEL', k, all[j]) else others = others + tonumber(s) end
      end
    end
    slots = math.max(0, math.min(cwant, climit - others))
    local held = math.max(slots, active)
    if held > 0 then
      redis.call('HSET', k, me, held .. ':' .. string.format('%.17g', now + hold))
    else
      redis.call('HDEL', k, me)
    end
    redis.call('EXPIRE', k, math.ceil(hold) + 1)
  end
  out[#out + 1] = string.format('%.17g', grant)
  out[#out + 1] = tostring(slots)
end
return out
"""


class LeaseSync:
    def __init__(self, url: str, prefix: str, limiter: TenantLimiter, loop: asyncio.AbstractEventLoop, *,
                 interval_s: float, hold_s: float, idle_s: float = 60.0) -> None:
        self._url = url
        self._prefix = prefix
        self._lim = limiter
        limiter.leasing = True
        self._loop = loop
        self._interval = interval_s
        self._hold = hold_s
        self._idle = max(idle_s, hold_s)
        self.holder = secrets.token_hex(8)
        self.last_ok = loop.time()
        self.synced = asyncio.Event()  # set after each successful sync (tests wait on it)
        self.failures = 0
        self._fell_back = False
        self._closed = False

    def close(self) -> None:
        self._closed = True

    async def run(self) -> None:
        client = aioredis.from_url(self._url, socket_timeout=max(1.0, self._interval * 2),
                                   socket_connect_timeout=2.0)
        script = client.register_script(LEASE_SCRIPT)
        try:
            while not self._closed:
                await self.sync_once(script)
                await asyncio.sleep(self._interval)
        finally:
            await client.aclose()

    async def release(self, timeout: float = 2.0) -> bool:
        """At shutdown (no request in flight): give every lease back, so the tenant's slots and
        tokens go to the other holders now instead of when the claims expire."""
        client = aioredis.from_url(self._url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return await self.sync_once(client.register_script(LEASE_SCRIPT), idle_s=-1.0)
        finally:
            await client.aclose()

    async def sync_once(self, script: aioredis.client.AsyncScript,  # type: ignore[name-defined]
                        idle_s: float | None = None) -> bool:
        lim = self._lim
        now = self._loop.time()
        asks = plan_leases(lim, now, self._idle if idle_s is None else idle_s)
        args: list[str | int | float] = [self._prefix, self.holder, self._hold, len(asks)]
        for a in asks:
            st = lim.states.get(a.tenant_id)
            args += [a.tenant_id, a.tpm_limit, a.tpm_want, a.debt, a.conc_limit, a.conc_want,
                     st.active if st is not None else 0]
        try:
            reply = await script(keys=[], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            if now - self.last_ok > self._hold and not self._fell_back:
                self._fell_back = True
                fall_back(lim, lim.holders, now)
                log.warning("tenant_limits_local_fallback", holders=lim.holders,
                            error=str(exc) or type(exc).__name__)
            return False
        now = self._loop.time()
        lim.holders = max(1, int(reply[0]))
        lim.leasing = True
        for i, a in enumerate(asks):
            apply_grant(lim, a, float(reply[1 + 2 * i]), int(reply[2 + 2 * i]), now)
        self.last_ok = now
        if self._fell_back:
            self._fell_back = False
            log.info("tenant_limits_leased_again", holders=lim.holders)
        self.synced.set()
        return True
