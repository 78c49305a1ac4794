"""The continuous-batching engine, driven with a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

import msgspec

from bench.sim.engine import ABORTED, FINISHED, RUNNING, WAITING, Engine, Seq
from bench.sim.profiles import Profile

PROFILE = Profile(name="t", base_s=0.01, per_seq_s=0.001, per_prefill_token_s=0.0001, per_context_token_s=0.0,
                  max_num_seqs=2, max_num_batched_tokens=100, kv_cache_tokens=10_000, block_size=16)


class Recorder:
    def __init__(self) -> None:
        self.tokens: list[tuple[Seq, str | None]] = []
        self.events: list[str] = []

    def on_token(self, seq: Seq, finish_reason: str | None) -> None:
        self.tokens.append((seq, finish_reason))

    def on_first_scheduled(self, seq: Seq, now: float) -> None:
        self.events.append(f"scheduled@{now:g}")

    def on_first_token(self, seq: Seq, now: float) -> None:
        self.events.append(f"first@{now:g}")

    def on_finished(self, seq: Seq, reason: str, now: float) -> None:
        self.events.append(f"finished:{reason}@{now:g}")

    def on_step(self, prefill_tokens: int, generated_tokens: int, preempted: int) -> None:
        pass


def seq(rec: Recorder, prompt: int = 10, out: int = 3, max_tokens: int = 3) -> Seq:
    return Seq(prompt, out, max_tokens=max_tokens, seed=1, sink=rec, arrival=0.0)


def run_steps(engine: Engine, now: float, steps: int) -> float:
    for _ in range(steps):
        dt = engine.schedule(now)
        if dt is None:
            break
        now += dt
        engine.complete_step(now)
    return now


def test_at_most_max_num_seqs_run_rest_wait_fifo() -> None:
    rec = Recorder()
    engine = Engine(PROFILE, rec)
    seqs = [seq(rec) for _ in range(3)]
    for s in seqs:
        engine.add(s)
    dt = engine.schedule(0.0)
    assert [s.state for s in seqs] == [RUNNING, RUNNING, WAITING]
    assert list(engine.waiting) == [seqs[2]]
    # step cost: base + per_seq * 2 + per_prefill_token * 20 prompt tokens
    assert dt is not None and abs(dt - (0.01 + 0.002 + 0.002)) < 1e-12


def test_one_token_per_step_and_finish_frees_slot() -> None:
    rec = Recorder()
    engine = Engine(PROFILE, rec)
    a, b, c = seq(rec), seq(rec), seq(rec)
    for s in (a, b, c):
        engine.add(s)
    run_steps(engine, 0.0, 1)
    assert (a.generated, b.generated, c.generated) == (1, 1, 0)  # prefill step emits the first token
    run_steps(engine, 1.0, 2)
    assert a.state == FINISHED and b.state == FINISHED
    assert [r for s, r in rec.tokens if s is a] == [None, None, "length"]
    run_steps(engine, 2.0, 1)
    assert c.state == RUNNING and c.generated == 1
    assert engine.free_blocks == engine.total_blocks - c.blocks


def test_eos_before_max_tokens_is_stop() -> None:
    rec = Recorder()
    engine = Engine(PROFILE, rec)
    s = seq(rec, out=2, max_tokens=50)
    engine.add(s)
    run_steps(engine, 0.0, 5)
    assert s.generated == 2 and rec.tokens[-1] == (s, "stop")


def test_chunked_prefill_respects_token_budget() -> None:
    rec = Recorder()
    engine = Engine(PROFILE, rec)
    long = seq(rec, prompt=250)
    engine.add(long)
    t = run_steps(engine, 0.0, 2)
    assert long.generated == 0 and long.computed == 200  # 100 tokens per step
    run_steps(engine, t, 1)
    assert long.generated == 1 and rec.events[:2] == ["scheduled@0", f"first@{long.first_token:g}"]


def test_abort_frees_slot_and_never_emits() -> None:
    rec = Recorder()
    engine = Engine(PROFILE, rec)
    a, b, c = seq(rec, out=100, max_tokens=100), seq(rec), seq(rec)
    for s in (a, b, c):
        engine.add(s)
    engine.schedule(0.0)
    assert engine.abort(a)  # during the step in flight
    engine.complete_step(0.1)
    assert a.state == ABORTED and all(s is not a for s, _ in rec.tokens)
    engine.schedule(0.1)
    assert c.state == RUNNING
    assert not engine.abort(a)


def test_kv_cache_full_preempts_newest() -> None:
    tiny = Profile(name="kv", base_s=0.01, per_seq_s=0.0, per_prefill_token_s=0.0, per_context_token_s=0.0,
                   max_num_seqs=8, max_num_batched_tokens=1000, kv_cache_tokens=64, block_size=16)
    rec = Recorder()
    engine = Engine(tiny, rec)
    a, b = seq(rec, prompt=16, out=40, max_tokens=40), seq(rec, prompt=16, out=40, max_tokens=40)
    engine.add(a)
    engine.add(b)
    run_steps(engine, 0.0, 1)
    assert engine.kv_usage() == 1.0  # 2 blocks each, of 4
    run_steps(engine, 1.0, 17)  # a needs a third block for its 33rd token: b (newest) is preempted
    assert b.state == WAITING and engine.waiting[0] is b and a.state == RUNNING


def test_admitted_requests_cost_their_step_and_scaled_prompts_are_what_prefill_computes() -> None:
    rec = Recorder()
    scaled = msgspec.structs.replace(PROFILE, prompt_scale=0.25, per_admitted_seq_s=0.005)
    engine = Engine(scaled, rec)
    a, b = seq(rec, prompt=200), seq(rec, prompt=2)
    engine.add(a)
    engine.add(b)
    assert (a.prefill_target, b.prefill_target) == (50, 1)  # a prompt never vanishes: at least 1 token
    dt = engine.schedule(0.0)
    # base + per_seq * 2 + per_prefill_token * 51 + per_admitted * 2; KV holds the scaled prompt
    assert dt is not None and abs(dt - (0.01 + 0.002 + 0.0051 + 0.010)) < 1e-12
    assert a.blocks == engine.blocks_for(51)
    engine.complete_step(dt)
    assert a.generated == 1 and b.generated == 1  # both prompts fit the 100-token budget at once
    dt2 = engine.schedule(dt)
    assert dt2 is not None and abs(dt2 - (0.01 + 0.002)) < 1e-12  # decode only: nobody admitted
