"""Cache-aware routing: send a prompt to the instance that probably holds its prefix (pure code).

Each gateway worker keeps its own approximate view of which instance holds which prompt prefix,
learned from its own decisions; no lock, no shared state between workers or replicas, no
tokenizer. Invariants and rules:

- **Prompt key.** The raw JSON bytes of ``messages`` (or ``prompt``) are cut into blocks of
  ``block_bytes``; block *i* is named by a CRC-32 chained over the bytes of blocks 0..i, seeded
  with model and tenant (tenants never share entries). Only full blocks are named. CRC-32 is
  stable across processes, so every worker and replica names a prompt the same way.
- **Per-instance index.** An LRU of block names per backend, sized from the instance's KV cache
  (``kv_capacity`` tokens at ``bytes_per_token``); a routed prompt's blocks are recorded head
  last, so a prefix's head is evicted last (as vLLM frees blocks tail first). A backend's view is
  dropped when its ``cache_epoch`` moves (engine restarted, ejected) and when it leaves the
  table (:meth:`PrefixRouter.keep`: removed, drained).
- **One cost, in tokens.** ``cost = uncached + queued``: the part of this prompt the instance
  does not hold, plus the prefill work queued there: the estimated uncached tokens of this
  worker's requests on it, while they are in flight (``Backend.prefill_inflight``, kept by the
  proxy) and not yet worked off at the assumed ``prefill_tokens_per_s`` (a backlog drained
  with time: a request stays in flight while it decodes, long after its prefill), plus the
  requests other workers sent (the engine's scraped queue less this worker's in flight at that
  scrape) at half the average uncached request each.
- **Saturation guard.** An instance whose KV cache is nearly full (``kv_saturated``) or whose
  queue exceeds the least-loaded one's by ``max_imbalance`` is skipped whatever it holds, unless
  every candidate is.
- **Cold placement.** When no candidate holds any block of the prompt, the instance is chosen
  among the less loaded (queue within ``cold_slack`` of the least) by rendezvous hashing of the
  first block's name (or of a session id the client sent), so independent workers place a new
  conversation on the same instance. The same rendezvous rank breaks cost ties.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Collection, Iterable

from gateway.backend import Backend
from gateway.balancer import load_score

_MASK = (1 << 64) - 1
_INF = float("inf")
DEFAULT_KV_TOKENS = 131_072  # an instance whose KV-cache size is not known yet


def _mix(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit rank from a (url, anchor) pair."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def _load(b: Backend, now: float, stale_after: float) -> float:
    """The backend's queue in requests: this worker's requests in flight there now, plus the
    other workers' at the last scrape (running + waiting less this worker's in flight then).
    Least-queue adds every request sent since the scrape, finished ones too, which would push a
    conversation off its instance at low load."""
    if b.queue is not None and now - b.scraped_at <= stale_after:
        return max(0.0, b.queue - b.inflight_at_scrape) + b.inflight
    return load_score(b, now, stale_after)


FOREIGN_WEIGHT = 0.5  # a request another worker sent is, on average, half-way through its prefill


def _queued_tokens(b: Backend, now: float, stale_after: float, avg: float, rate: float) -> float:
    """Prefill work queued on the instance, in tokens: the uncached part of this worker's requests
    there, as long as they are in flight and the assumed prefill rate has not worked it off (a
    request in flight may be decoding long after its prefill), plus the requests of other
    workers and replicas (the engine's scraped queue less this worker's requests in flight at
    that scrape: its own that have finished since must not count) at half an average request
    each."""
    own = min(b.prefill_inflight, max(0.0, b.prefill_backlog - (now - b.backlog_at) * rate))
    if b.queue is not None and now - b.scraped_at <= stale_after:
        return own + max(0.0, b.queue - b.inflight_at_scrape) * avg * FOREIGN_WEIGHT
    return own


def _matched(lru: OrderedDict[int, None], blocks: list[int]) -> int:
    """How many leading blocks the backend probably holds (binary search: a prefix is recorded
    and evicted as a whole, head last)."""
    if not blocks or not lru:
        return 0
    lo, hi = 0, len(blocks)  # blocks[:lo] held; blocks[hi:] not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blocks[mid - 1] in lru:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PromptKey:
    """The named blocks of one prompt, its size in estimated tokens, its placement anchor."""

    __slots__ = ("anchor", "blocks", "tokens")

    def __init__(self, blocks: list[int], tokens: int, anchor: int) -> None:
        self.blocks = blocks
        self.tokens = tokens
        self.anchor = anchor


class _View:
    """This worker's view of one backend: the LRU of block names it probably holds."""

    __slots__ = ("epoch", "lru", "rank_seed")

    def __init__(self, b: Backend) -> None:
        self.epoch = b.cache_epoch
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.rank_seed = zlib.crc32(b.url.encode()) << 32

    def rank(self, key: PromptKey) -> int:
        """Rendezvous rank of this backend for the key's anchor: the same in every process."""
        return _mix(self.rank_seed ^ key.anchor)


class PrefixRouter:
    __slots__ = (
        "_views",
        "avg_uncached",
        "block_bytes",
        "bytes_per_token",
        "cold_slack",
        "decisions",
        "evictions",
        "hit_tokens",
        "kv_saturated",
        "max_imbalance",
        "prefill_tokens_per_s",
        "query_tokens",
    )

    def __init__(self, *, block_bytes: int = 1024, bytes_per_token: float = 4.0, kv_saturated: float = 0.95,
                 max_imbalance: float = 16.0, cold_slack: float = 1.0,
                 prefill_tokens_per_s: float = 20_000.0) -> None:
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.block_bytes = block_bytes
        self.bytes_per_token = bytes_per_token
        self.kv_saturated = kv_saturated
        self.max_imbalance = max_imbalance
        self.cold_slack = cold_slack
        self._views: dict[Backend, _View] = {}
        self.avg_uncached = 0.0  # running mean of the uncached tokens of routed prompts
        self.decisions = 0
        self.query_tokens = 0  # tokens of routed prompts (estimated)
        self.hit_tokens = 0  # of those, the part the chosen instance was estimated to hold
        self.evictions = 0

    # -- prompt keys ------------------------------------------------------------------------------
    def key(self, raw: bytes | memoryview, model: str, tenant_id: int,
            session: bytes | None = None) -> PromptKey:
        """Name the full blocks of ``raw`` (the prompt's JSON bytes as the client sent them)."""
        seed = zlib.crc32(b"%d\x00%b" % (tenant_id, model.encode()))
        size = self.block_bytes
        view = memoryview(raw)
        blocks: list[int] = []
        h = seed
        for lo in range(0, len(raw) - size + 1, size):
            h = zlib.crc32(view[lo:lo + size], h)
            blocks.append(h)
        if session:  # the client names its conversation: place it by that
            anchor = zlib.crc32(session, seed)
        elif blocks:
            anchor = blocks[0]
        else:
            anchor = zlib.crc32(raw, seed)
        return PromptKey(blocks, max(1, int(len(raw) / self.bytes_per_token)), anchor)

    # -- the choice -------------------------------------------------------------------------------
    def choose(self, backends: tuple[Backend, ...], key: PromptKey, now: float, *, stale_after: float,
               max_inflight: int = 0, exclude: Collection[Backend] = ()) -> Backend | None:
        """The backend for this prompt; None when all are excluded or at ``max_inflight`` (the
        caller queues). The caller :meth:`record` s the prompt on the backend it sends it to."""
        cands: list[tuple[Backend, float]] = []
        ejected: list[tuple[Backend, float]] = []
        least = _INF
        for b in backends:
            if (exclude and b in exclude) or (max_inflight and b.inflight >= max_inflight):
                continue
            s = _load(b, now, stale_after)
            if b.ejected_until > now:
                ejected.append((b, s))
                continue
            cands.append((b, s))
            least = min(least, s)
        if not cands:
            cands = ejected  # every candidate is ejected: ignore ejection rather than fail all
            if not cands:
                return None
            least = min(s for _, s in cands)
        # the saturation guard, then one cost in tokens for each instance that passes it
        limit = least + self.max_imbalance
        fresh_after = now - stale_after
        saturated = self.kv_saturated
        per_block = self.block_bytes / self.bytes_per_token
        avg = self.avg_uncached if self.decisions else key.tokens
        rate = self.prefill_tokens_per_s
        tokens, blocks = key.tokens, key.blocks
        ok: list[tuple[Backend, float, _View]] = []
        best: _View | None = None
        best_b = cands[0][0]
        best_cost = _INF
        known = False  # some instance holds a block of this prompt
        for b, s in cands:
            kv = b.kv_usage
            if s >= limit or (kv is not None and kv >= saturated and b.scraped_at >= fresh_after):
                continue
            view = self._view(b)
            ok.append((b, s, view))
            matched = _matched(view.lru, blocks)
            known = known or matched > 0
            cost = max(0.0, tokens - matched * per_block) + _queued_tokens(b, now, stale_after, avg, rate)
            if cost < best_cost or (cost == best_cost and best is not None
                                    and view.rank(key) > best.rank(key)):
                best, best_b, best_cost = view, b, cost
        if not ok:  # every instance is saturated: the least loaded, whatever it holds
            ok = [(b, s, self._view(b)) for b, s in cands if s == least]
        if not known:  # nothing known anywhere: rendezvous among the less loaded
            floor = min(s for _, s, _ in ok) + self.cold_slack
            best_rank = -1
            for b, s, view in ok:
                if s <= floor:
                    rank = view.rank(key)
                    if rank > best_rank:
                        best_b, best_rank = b, rank
        return best_b

    def _view(self, b: Backend) -> _View:
        view = self._views.get(b)
        if view is None or view.epoch != b.cache_epoch:
            view = self._views[b] = _View(b)
        return view

    def record(self, b: Backend, key: PromptKey, now: float) -> float:
        """The prompt was sent to ``b``: it holds the prompt's blocks from now on, and its
        uncached part joins the backend's prefill backlog. Returns the estimated uncached tokens,
        which the caller keeps in ``b.prefill_inflight`` while the request is in flight."""
        view = self._view(b)
        matched = _matched(view.lru, key.blocks)
        self.query_tokens += key.tokens
        hit = min(key.tokens, int(matched * self.block_bytes / self.bytes_per_token))
        self.hit_tokens += hit
        self.decisions += 1
        uncached = float(key.tokens - hit)
        worked_off = (now - b.backlog_at) * self.prefill_tokens_per_s
        b.prefill_backlog = max(0.0, b.prefill_backlog - worked_off) + uncached
        b.backlog_at = now
        # a mean over the first 20 decisions, then exponentially weighted (recent traffic counts most)
        self.avg_uncached += ((key.tokens - hit) - self.avg_uncached) / min(self.decisions, 20)
        if not key.blocks:
            return uncached
        lru = view.lru
        for h in reversed(key.blocks):  # head last: most recently used, evicted last
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        cap = max(1, int((b.kv_capacity or DEFAULT_KV_TOKENS) * self.bytes_per_token / self.block_bytes))
        while len(lru) > cap:
            lru.popitem(last=False)
            self.evictions += 1
        return uncached

    # -- the view's lifecycle (control path) ------------------------------------------------------
    def keep(self, live: Iterable[Backend]) -> None:
        """Forget backends no table routes to any more (removed, drained)."""
        live = set(live)
        for b in [b for b in self._views if b not in live]:
            del self._views[b]

    def retire(self, b: Backend) -> None:
        self._views.pop(b, None)

    def matched(self, b: Backend, key: PromptKey) -> int:
        """Leading blocks of the key this worker believes the backend holds."""
        return _matched(self._view(b).lru, key.blocks)

    def blocks(self, b: Backend) -> int:
        view = self._views.get(b)
        return len(view.lru) if view is not None and view.epoch == b.cache_epoch else 0
