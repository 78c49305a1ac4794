"""vLLM's automatic prefix caching, modelled over the engine's KV blocks (pure bookkeeping).

What vLLM does (V1 ``KVCacheManager`` / ``BlockPool``) and what this models:

- a request's tokens are cut into blocks of ``block_size`` tokens; only *full* blocks are
  cached, each identified by a hash chained over the prefix: ``h_i = hash((h_{i-1}, tokens of
  block i))``, so a block hits only if every block before it hit too;
- on admission the longest run of cached leading blocks is reused and needs no prefill; the hit
  is capped at ``num_tokens - 1`` tokens (rounded down to full blocks) so at least one token is
  computed and yields logits;
- blocks become cached as they fill (after each prefill chunk, and a finished, aborted or
  preempted sequence's decoded tokens too); a cached block held by no running sequence stays in
  the free pool with its content until the pool needs it: free blocks are reused least recently
  freed first, and a sequence frees its blocks tail first, so a prefix's first block outlives its
  last;
- ``queries`` and ``hits`` count tokens (vLLM's ``vllm:prefix_cache_queries`` and
  ``vllm:prefix_cache_hits``): every admission queries all its tokens and hits the reused ones.

The simulator has no tokenizer: a token is a whitespace-separated word of the prompt
(:mod:`bench.sim.textgen`), the words of every chat message in order, and a sequence's
generated tokens are its generated words, so a next chat turn that resends an answer hits the
blocks the answer filled. A completion prompt of token ids uses the ids.

Approximation, stated: the engine counts each running sequence's blocks as its own, so two
sequences running on one shared prefix hold it twice (vLLM shares the physical blocks); KV use is
overstated in that case, never understated. The pool's cached free blocks are a subset of its
free blocks: :meth:`PrefixCache.fit` evicts the least recently freed ones whenever the engine's
free count falls below their number, i.e. blocks never used or holding no full block are taken
first. Invariant: ``len(free) <= engine.free_blocks`` at every admission.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from bench.sim.textgen import WORDS, token_index

Token = str | int
_ROOT = 0  # the parent hash of the first block (vLLM: NONE_HASH)


class SeqPrefix:
    """The prefix-cache view of one sequence: its tokens, chained block hashes, blocks it holds."""

    __slots__ = ("hashes", "held", "prompt", "seed")

    def __init__(self, prompt: Sequence[Token], seed: int) -> None:
        self.prompt = prompt
        self.seed = seed  # its generated words (textgen.token_index), the tokens after the prompt
        self.hashes: list[int] = []  # chained hashes of the full blocks computed so far
        self.held = 0  # hashes[:held] are referenced by this sequence in the cache

    def token(self, i: int) -> Token:
        n = len(self.prompt)
        return self.prompt[i] if i < n else WORDS[token_index(self.seed, i - n)]

    def hash_blocks(self, n_blocks: int, block_size: int) -> list[int]:
        """Extend the chained hashes to ``n_blocks`` full blocks; returns the list."""
        hashes = self.hashes
        parent = hashes[-1] if hashes else _ROOT
        prompt = self.prompt
        for b in range(len(hashes), n_blocks):
            lo, hi = b * block_size, (b + 1) * block_size
            block = tuple(prompt[lo:hi]) if hi <= len(prompt) else tuple(self.token(i) for i in range(lo, hi))
            parent = hash((parent, block))
            hashes.append(parent)
        return hashes


def chat_tokens(contents: Sequence[str]) -> list[Token]:
    """The tokens of a chat request: every message's words in order (the simulator's count rule)."""
    out: list[Token] = []
    for text in contents:
        out += text.split()
    return out


class PrefixCache:
    """Block hashes cached in the engine's KV pool: held by running sequences or free (LRU)."""

    __slots__ = ("_free", "_used", "block_size", "evictions", "hits", "queries")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._used: dict[int, int] = {}  # hash -> number of running sequences holding it
        self._free: OrderedDict[int, None] = OrderedDict()  # cached, held by none; first = evicted first
        self.queries = 0  # tokens looked up (vllm:prefix_cache_queries)
        self.hits = 0  # of those, tokens found cached (vllm:prefix_cache_hits)
        self.evictions = 0  # cached blocks whose content was overwritten

    @property
    def cached_blocks(self) -> int:
        return len(self._used) + len(self._free)

    def contains(self, h: int) -> bool:
        return h in self._used or h in self._free

    def fit(self, free_blocks: int) -> None:
        """Evict least recently freed cached blocks until they fit in ``free_blocks``."""
        free = self._free
        while len(free) > free_blocks:
            free.popitem(last=False)
            self.evictions += 1

    def admit(self, sp: SeqPrefix, num_tokens: int, free_blocks: int) -> int:
        """A sequence of ``num_tokens`` tokens is admitted: hold its cached prefix and return the
        number of tokens that need no prefill (full blocks, at most ``num_tokens - 1``)."""
        self.fit(free_blocks)
        bs = self.block_size
        hashes = sp.hash_blocks(max(0, num_tokens - 1) // bs, bs)
        limit = max(0, num_tokens - 1) // bs
        used, free = self._used, self._free
        n = 0
        while n < limit:
            h = hashes[n]
            if h in used:
                used[h] += 1
            elif h in free:
                del free[h]
                used[h] = 1
            else:
                break
            n += 1
        sp.held = n
        self.queries += num_tokens
        self.hits += n * bs
        return n * bs

    def computed(self, sp: SeqPrefix, computed_tokens: int) -> None:
        """The sequence's KV now covers ``computed_tokens``: cache its newly full blocks."""
        n_blocks = computed_tokens // self.block_size
        if n_blocks <= sp.held:
            return
        hashes = sp.hash_blocks(n_blocks, self.block_size)
        used, free = self._used, self._free
        for h in hashes[sp.held:n_blocks]:
            if h in used:
                used[h] += 1
            else:
                free.pop(h, None)
                used[h] = 1
        sp.held = n_blocks

    def release(self, sp: SeqPrefix, computed_tokens: int) -> None:
        """The sequence leaves the running set (finished, aborted, preempted): its full blocks
        stay cached, freed tail first so the head of a prefix is evicted last."""
        self.computed(sp, computed_tokens)
        used, free = self._used, self._free
        for h in reversed(sp.hashes[:sp.held]):
            left = used[h] - 1
            if left:
                used[h] = left
            else:
                del used[h]
                free[h] = None  # the most recently freed: evicted last
        sp.held = 0
