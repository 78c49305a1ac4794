"""Offline prediction of a direct benchmark run: the engine on a fake clock, no sockets.

``predict(profile, workload, concurrency)`` replays what ``hpcgate bench run`` does against a
fresh simulator (all N requests arrive at t=0, max concurrency N) through the same
:class:`~bench.sim.engine.Engine`, and returns the same metrics (via ``stats``), so profile
constants can be fitted in milliseconds instead of minutes. A real direct run then measures
the simulator's fidelity over sockets (the gap is HTTP, event-loop and timer overhead).

    python -m bench.calibrate                      # the predicted Table 1 direct cells
    python -m bench.calibrate --compare DIR/results.json   # paper / predicted / measured, errors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.paper import paper_value
from bench.sim.engine import Engine, Seq
from bench.sim.profiles import PROFILES, Profile
from bench.stats import RequestRecord, calculate_metrics
from bench.workload import Workload, synthetic


class _Times:
    __slots__ = ("times",)

    def __init__(self) -> None:
        self.times: list[float] = []


class _Clock:
    now = 0.0


class _Sink:
    def __init__(self, clock: _Clock, times: _Times) -> None:
        self.clock, self.rec = clock, times

    def on_token(self, seq: Seq, finish_reason: str | None) -> None:
        self.rec.times.append(self.clock.now)


class _NoMetrics:
    def on_first_scheduled(self, seq: Seq, now: float) -> None: ...
    def on_first_token(self, seq: Seq, now: float) -> None: ...
    def on_finished(self, seq: Seq, reason: str, now: float) -> None: ...
    def on_step(self, prefill_tokens: int, generated_tokens: int, preempted: int) -> None: ...


def predict(profile: Profile, workload: Workload, concurrency: int) -> dict[str, object]:
    n = min(concurrency, len(workload))
    engine = Engine(profile, _NoMetrics())
    clock = _Clock()
    times = [_Times() for _ in range(n)]
    for i in range(n):
        out = workload.output_lens[i]
        engine.add(Seq(workload.prompt_lens[i], out, max_tokens=out, seed=i, sink=_Sink(clock, times[i]),
                       arrival=0.0))
    while engine.has_work():
        dt = engine.schedule(clock.now)
        if dt is None:
            raise RuntimeError("engine stalled: a request does not fit the KV cache")
        clock.now += dt
        engine.complete_step(clock.now)
    records = []
    for i, t in enumerate(times):
        records.append(RequestRecord(
            index=i, prompt_len=workload.prompt_lens[i], max_tokens=len(t.times), success=True,
            ttft=t.times[0],
            latency=t.times[-1], output_tokens=len(t.times),
            itl=[b - a for a, b in zip(t.times, t.times[1:], strict=False)]))
    return calculate_metrics(records, clock.now)


KEYS = ("median_ttft_ms", "median_tpot_ms", "median_e2el_ms", "request_throughput", "output_throughput",
        "total_input_tokens", "total_output_tokens")


def compare(results_json: str) -> str:
    """Markdown: per direct cell and metric, paper / predicted / measured and the errors."""
    doc = json.loads(Path(results_json).read_text())
    lines = ["| profile | conc. | metric | paper | predicted | measured | measured vs predicted | "
             "measured vs paper |", "|---|---|---|---|---|---|---|---|"]
    for cell in doc["cells"]:
        if cell["target"] != "direct" or not cell["metrics"]:
            continue
        prof, level = cell["profile"], cell["concurrency"]
        pred = predict(PROFILES[prof], synthetic(level, 0), level)
        for key in KEYS:
            got, want = float(cell["metrics"][key]), float(pred[key])  # type: ignore[arg-type]
            paper = paper_value(prof, level, key)
            vs_pred = f"{100 * (got - want) / want:+.1f}%" if want else "n/a"
            vs_paper = f"{100 * (got - paper) / paper:+.1f}%" if paper else "n/a (not available)"
            lines.append(f"| {prof} | {level} | {key} | {paper if paper is not None else 'n/a'} | {want:.2f} "
                         f"| {got:.2f} | {vs_pred} | {vs_paper} |")
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--compare"]:
        print(compare(args[1]))
        return
    names = args or ["gpu-s", "gpu-l"]
    print("profile conc " + " ".join(f"{k:>20}" for k in KEYS))
    for name in names:
        for level in (100, 500, 1000):
            m = predict(PROFILES[name], synthetic(level, 0), level)
            print(f"{name:7} {level:4} " + " ".join(f"{float(m[k]):20.2f}" for k in KEYS))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
