"""Continuous batching over a modelled GPU: pure bookkeeping, driven by an explicit clock.

The engine never sleeps and never touches I/O. Its driver (``app.EngineLoop``) calls
:meth:`Engine.schedule` with the current time, waits the returned step duration, then calls
:meth:`Engine.complete_step`, which emits one token to every sequence of the step and retires
finished ones. Unit tests drive it with a fake clock.

Invariants:
- at most ``max_num_seqs`` sequences are running; the rest wait in FIFO order;
- a prompt of ``n`` tokens is computed (and held in the KV cache) as the profile's
  ``engine_prompt_len(n)`` tokens, and each request a step admits adds to that step's cost
  (``Profile.step_time``);
- a step's tokens are bounded by ``max_num_batched_tokens``: one per decoding sequence, the
  rest goes to (chunked) prefill of running and newly admitted sequences, oldest first;
- KV-cache blocks (``block_size`` tokens each) are allocated on admission for the prompt and
  one block at a time while decoding; when none is free the newest running sequence is
  preempted (its blocks freed, put back at the head of the queue, recomputed later: vLLM's
  recompute preemption);
- with prefix caching (:mod:`bench.sim.prefix_cache`, on by default as in vLLM V1), a sequence
  admitted with cached leading blocks starts its prefill past them: a step's prefill tokens
  count only uncached tokens; the marked hooks are the only places the engine calls it;
- an aborted sequence leaves the engine at once, frees its blocks and never emits again,
  even if it belonged to the step in flight.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from bench.sim.prefix_cache import PrefixCache, SeqPrefix
from bench.sim.profiles import Profile

WAITING, RUNNING, FINISHED, ABORTED = 0, 1, 2, 3


class Sink(Protocol):
    """Receives a sequence's tokens (the HTTP response of its request)."""

    def on_token(self, seq: Seq, finish_reason: str | None) -> None: ...


class Observer(Protocol):
    """Receives engine events for metrics."""

    def on_first_scheduled(self, seq: Seq, now: float) -> None: ...
    def on_first_token(self, seq: Seq, now: float) -> None: ...
    def on_finished(self, seq: Seq, reason: str, now: float) -> None: ...
    def on_step(self, prefill_tokens: int, generated_tokens: int, preempted: int) -> None: ...


class Seq:
    """One request inside the engine."""

    __slots__ = (
        "arrival", "blocks", "computed", "first_scheduled", "first_token", "generated",
        "max_tokens", "out_len", "prefill_target", "prefilled", "prefix", "priority", "prompt_len", "seed",
        "sink",
        "state",
    )

    def __init__(self, prompt_len: int, out_len: int, *, max_tokens: int, seed: int, sink: Sink,
                 arrival: float, priority: int = 0) -> None:
        self.priority = priority        # with the priority policy: lower runs first (vLLM's rule)
        self.prompt_len = prompt_len
        self.out_len = out_len          # tokens it will generate (EOS or max_tokens)
        self.max_tokens = max_tokens    # finish reason is "length" when out_len reaches it
        self.seed = seed                # picks the fake text
        self.sink = sink
        self.arrival = arrival
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.state = WAITING
        self.generated = 0              # tokens emitted so far
        self.computed = 0               # tokens whose KV is computed
        self.prefill_target = prompt_len
        self.prefilled = False
        self.blocks = 0                 # KV blocks held
        self.prefix: SeqPrefix | None = None  # its tokens for the prefix cache; None: never cached


class Engine:
    __slots__ = ("_batch", "by_priority", "free_blocks", "max_num_seqs", "observer", "prefix_cache",
                 "profile", "running", "total_blocks", "waiting")

    def __init__(self, profile: Profile, observer: Observer, max_num_seqs: int | None = None, *,
                 by_priority: bool = False, prefix_caching: bool = True) -> None:
        self.profile = profile
        # vLLM's --scheduling-policy priority: the waiting queue is ordered by (priority, arrival)
        # instead of arrival alone. (vLLM also preempts a running lower-priority request for a
        # waiting higher-priority one; the simulator only orders admission.)
        self.by_priority = by_priority
        self.observer = observer
        self.max_num_seqs = max_num_seqs or profile.max_num_seqs
        self.total_blocks = max(1, profile.kv_cache_tokens // profile.block_size)
        self.free_blocks = self.total_blocks
        self.waiting: deque[Seq] = deque()
        self.running: dict[Seq, None] = {}  # insertion order = admission order
        self._batch: list[tuple[Seq, int]] = []  # the step in flight: (seq, prefill chunk or 0)
        # vLLM's automatic prefix caching (bench/sim/prefix_cache.py); the hooks below are marked
        self.prefix_cache = PrefixCache(profile.block_size) if prefix_caching else None

    # --- queries -------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.profile.block_size)

    # --- requests ------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        # The engine computes the prompt as the profile sees it reaching the GPU (prompt_scale).
        seq.prefill_target = self.profile.engine_prompt_len(seq.prompt_len)
        waiting = self.waiting
        if not self.by_priority or not waiting or waiting[-1].priority <= seq.priority:
            waiting.append(seq)
            return
        i = len(waiting)
        while i > 0 and waiting[i - 1].priority > seq.priority:  # after equals: FIFO within a level
            i -= 1
        waiting.insert(i, seq)

    def abort(self, seq: Seq) -> bool:
        """Remove a waiting or running sequence; False if it already finished."""
        if seq.state == RUNNING:
            del self.running[seq]
        elif seq.state == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                return False
        else:
            return False
        self._release(seq)
        seq.state = ABORTED
        return True

    # prefix-cache hooks: the cache counts the request's own tokens, the engine computes the
    # prompt as the profile's engine_prompt_len (prompt_scale); generated tokens count 1:1 in both
    def _cache_tokens(self, seq: Seq, engine_tokens: int) -> int:
        pe = self.profile.engine_prompt_len(seq.prompt_len)
        if engine_tokens <= pe:
            return engine_tokens * seq.prompt_len // pe
        return seq.prompt_len + engine_tokens - pe

    def _engine_tokens(self, seq: Seq, tokens: int) -> int:
        pe = self.profile.engine_prompt_len(seq.prompt_len)
        if tokens <= seq.prompt_len:
            return tokens * pe // seq.prompt_len
        return pe + tokens - seq.prompt_len

    def _release(self, seq: Seq) -> None:
        """Free a sequence's KV blocks (finished, aborted or preempted)."""
        if self.prefix_cache is not None and seq.prefix is not None:  # prefix-cache hook
            self.prefix_cache.release(seq.prefix, self._cache_tokens(seq, seq.computed))
        self.free_blocks += seq.blocks
        seq.blocks = 0

    # --- steps ---------------------------------------------------------------------------
    def _preempt_newest(self) -> Seq:
        victim = next(reversed(self.running))
        del self.running[victim]
        self._release(victim)
        victim.state = WAITING
        victim.computed = 0
        victim.prefilled = False
        victim.prefill_target = self.profile.engine_prompt_len(victim.prompt_len) + victim.generated
        self.waiting.appendleft(victim)
        return victim

    def schedule(self, now: float) -> float | None:
        """Plan the next step; returns its duration, or None when there is nothing to run."""
        budget = self.profile.max_num_batched_tokens
        batch: list[tuple[Seq, int]] = []
        prefill = context = preempted = admitted = 0
        for seq in list(self.running):
            if seq.state != RUNNING:  # preempted earlier in this loop
                continue
            if seq.prefilled:
                if budget < 1:
                    continue
                if self.blocks_for(seq.computed + 1) > seq.blocks:
                    while self.free_blocks < 1 and seq.state == RUNNING:
                        self._preempt_newest()
                        preempted += 1
                    if seq.state != RUNNING:
                        continue
                    seq.blocks += 1
                    self.free_blocks -= 1
                budget -= 1
                context += seq.computed
                batch.append((seq, 0))
            else:
                chunk = min(budget, seq.prefill_target - seq.computed)
                if chunk > 0:
                    budget -= chunk
                    prefill += chunk
                    batch.append((seq, chunk))
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            need = self.blocks_for(seq.prefill_target + 1)
            if need > self.free_blocks:
                break
            self.waiting.popleft()
            if self.prefix_cache is not None and seq.prefix is not None:
                # prefix-cache hook: cached leading blocks need no prefill (computed starts past them)
                hit = self.prefix_cache.admit(seq.prefix, self._cache_tokens(seq, seq.prefill_target),
                                              self.free_blocks)
                seq.computed = min(seq.prefill_target - 1, self._engine_tokens(seq, hit))
            seq.state = RUNNING
            seq.blocks = need
            self.free_blocks -= need
            self.running[seq] = None
            if seq.first_scheduled is None:
                seq.first_scheduled = now
                self.observer.on_first_scheduled(seq, now)
            chunk = min(budget, seq.prefill_target - seq.computed)
            budget -= chunk
            prefill += chunk
            admitted += 1
            batch.append((seq, chunk))
        self._batch = batch
        if not batch:
            return None
        self.observer.on_step(prefill, 0, preempted)
        return self.profile.step_time(len(batch), prefill, context, admitted)

    def complete_step(self, now: float) -> int:
        """Apply the step in flight: one token to each sequence that finished prefill or decodes."""
        emitted = 0
        for seq, chunk in self._batch:
            if seq.state != RUNNING:  # aborted or preempted during the step
                continue
            if chunk:
                seq.computed += chunk
                if self.prefix_cache is not None and seq.prefix is not None:  # prefix-cache hook
                    self.prefix_cache.computed(seq.prefix, self._cache_tokens(seq, seq.computed))
                if seq.computed < seq.prefill_target:
                    continue
                seq.prefilled = True
            else:
                seq.computed += 1
            seq.generated += 1
            emitted += 1
            if seq.first_token is None:
                seq.first_token = now
                self.observer.on_first_token(seq, now)
            if seq.generated >= seq.out_len:
                reason = "length" if seq.generated >= seq.max_tokens else "stop"
                del self.running[seq]
                self._release(seq)
                seq.state = FINISHED
                seq.sink.on_token(seq, reason)
                self.observer.on_finished(seq, reason, now)
            else:
                seq.sink.on_token(seq, None)
        self._batch = []
        self.observer.on_step(0, emitted, 0)
        return emitted
