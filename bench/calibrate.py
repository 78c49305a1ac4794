"""``hpcgate bench calibrate``: the simulator's GPU profiles fitted to the paper's Table 1, offline.

``predict(profile, workload, concurrency)`` replays what ``hpcgate bench run`` does against a
fresh simulator (N requests at max concurrency N, reaching the engine :data:`ARRIVAL_GAP_S`
apart as the driver sends them; the first arrival starts a step on its own, as in the real
simulator and in vLLM) through the same :class:`~bench.sim.engine.Engine` on a fake clock, and
returns the same metrics (via ``stats``): a Table 1 cell in a fraction of a second instead of a
minute of wall clock.

``--fit`` searches the profile parameters that the hardware does not pin (:data:`FIT_PARAMS`)
so that the predicted direct cells match the paper's "vLLM Node" cells (:data:`FIT_KEYS` at
100/500/1000 requests, 18 numbers per profile), prints the error per cell and writes them to
``bench/sim/calibrated.py``. The search is Nelder-Mead on the logarithms of the parameters
(all positive), minimising the squared log errors plus a penalty on the worst one, so that no
cell is given up for the others. ``--compare RESULTS`` puts a measured ``bench table`` run
beside the paper and the prediction. ``tests/bench/test_calibration.py`` keeps every predicted
direct cell of the committed profiles within :data:`TOLERANCE` of the paper.

    hpcgate bench calibrate                        # paper / predicted / error for every cell
    hpcgate bench calibrate --fit                  # refit gpu-s and gpu-l, write calibrated.py
    hpcgate bench calibrate --compare DIR/results.json

Unknown profile names and a missing results file end with a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from bench.paper import paper_levels, paper_value
from bench.sim.engine import Engine, Seq
from bench.sim.profiles import FIT_PARAMS, PROFILES, Profile
from bench.stats import RequestRecord, calculate_metrics
from bench.workload import Workload, synthetic

# The direct numbers the fit matches and the test checks: 6 per cell, 36 in all.
FIT_KEYS = ("median_ttft_ms", "median_tpot_ms", "median_e2el_ms", "request_throughput",
            "output_throughput", "duration")
TOLERANCE = 0.25
# The load driver sends N requests that are all due at once about 0.15 ms apart (measured: the
# 100 requests of a Table 1 cell reach the simulator within 12-17 ms on the 2-core dev machine).
ARRIVAL_GAP_S = 0.00015
CALIBRATED_PY = Path(__file__).parent / "sim" / "calibrated.py"


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


def predict(profile: Profile, workload: Workload, concurrency: int,
            arrival_gap_s: float = ARRIVAL_GAP_S) -> dict[str, float]:
    n = min(concurrency, len(workload))
    engine = Engine(profile, _NoMetrics())
    clock = _Clock()
    times = [_Times() for _ in range(n)]
    outs = workload.output_lens
    pending = [Seq(workload.prompt_lens[i], outs[i], max_tokens=outs[i], seed=i, sink=_Sink(clock, times[i]),
                   arrival=i * arrival_gap_s) for i in range(n)]
    nxt = 0
    while nxt < n or engine.has_work():
        while nxt < n and pending[nxt].arrival <= clock.now:
            engine.add(pending[nxt])
            nxt += 1
        dt = engine.schedule(clock.now)
        if dt is None:
            if nxt == n:
                raise RuntimeError("engine stalled: a request does not fit the KV cache")
            clock.now = pending[nxt].arrival  # idle until the next request arrives
            continue
        clock.now += dt
        engine.complete_step(clock.now)
    records = []
    for i, t in enumerate(times):
        arrival = pending[i].arrival  # the driver's clock starts when it sends the request
        records.append(RequestRecord(
            index=i, prompt_len=workload.prompt_lens[i], max_tokens=len(t.times), success=True,
            ttft=t.times[0] - arrival,
            latency=t.times[-1] - arrival, output_tokens=len(t.times),
            itl=[b - a for a, b in zip(t.times, t.times[1:], strict=False)]))
    return {k: float(v) for k, v in calculate_metrics(records, clock.now).items()}  # type: ignore[arg-type]


class CellError(msgspec.Struct, frozen=True):
    profile: str
    concurrency: int
    key: str
    paper: float
    ours: float

    @property
    def error(self) -> float:
        return (self.ours - self.paper) / self.paper


def predicted_errors(profile: Profile, keys: Sequence[str] = FIT_KEYS) -> list[CellError]:
    """Predicted vs paper for every Table 1 level of ``profile`` (the synthetic workload of its totals)."""
    out = []
    for level in paper_levels(profile.name):
        got = predict(profile, synthetic(level, 0, profile.name), level)
        for key in keys:
            paper = paper_value(profile.name, level, key)
            if paper is not None:
                out.append(CellError(profile.name, level, key, paper, got[key]))
    return out


# --- the search (pure) ---------------------------------------------------------------------------
def nelder_mead(f: Callable[[list[float]], float], x0: Sequence[float], *, step: float = 0.3,
                iters: int = 60) -> tuple[list[float], float]:
    """Minimise ``f`` from ``x0`` (standard reflection/expansion/contraction/shrink)."""
    n = len(x0)
    pts = [list(x0)] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        c = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        xr = [c[j] + (c[j] - pts[-1][j]) for j in range(n)]
        fr = f(xr)
        if fr < vals[0]:
            xe = [c[j] + 2 * (c[j] - pts[-1][j]) for j in range(n)]
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = [c[j] + 0.5 * (pts[-1][j] - c[j]) for j in range(n)]
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = [pts[0][j] + 0.5 * (pts[i][j] - pts[0][j]) for j in range(n)]
                    vals[i] = f(pts[i])
    best = min(range(n + 1), key=vals.__getitem__)
    return pts[best], vals[best]


def loss(errors: Sequence[CellError]) -> float:
    logs = [math.log(e.ours / e.paper) for e in errors]
    return sum(v * v for v in logs) + 4 * max(abs(v) for v in logs) ** 2


def fit(profile: Profile, iters: int = 60) -> Profile:
    """``profile`` with :data:`FIT_PARAMS` searched from its current values."""
    def with_params(x: list[float]) -> Profile:
        params = {k: math.exp(v) for k, v in zip(FIT_PARAMS, x, strict=True)}
        return msgspec.structs.replace(profile, **params)

    def objective(x: list[float]) -> float:
        try:
            return loss(predicted_errors(with_params(x)))
        except RuntimeError:  # a request that no longer fits the KV cache: not a candidate
            return math.inf

    x0 = [math.log(getattr(profile, k)) for k in FIT_PARAMS]
    best, _ = nelder_mead(objective, x0, iters=iters)
    return with_params(best)


def write_calibrated(profiles: Sequence[Profile], path: Path = CALIBRATED_PY) -> None:
    lines = ['"""Generated by ``hpcgate bench calibrate --fit``: the fitted step-cost parameters of the',
             "calibrated profiles (see bench/calibrate.py and docs/simulator.md). Refit, do not edit.",
             '"""', "", "FITTED: dict[str, dict[str, float]] = {"]
    for p in profiles:
        lines.append(f'    "{p.name}": {{')
        lines += [f'        "{k}": {getattr(p, k):.4g},' for k in FIT_PARAMS]
        lines.append("    },")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


# --- reports -------------------------------------------------------------------------------------
def error_table(errors: Sequence[CellError]) -> str:
    lines = ["| profile | conc. | metric | paper | predicted | error |", "|---|---|---|---|---|---|"]
    for e in errors:
        flag = "" if abs(e.error) <= TOLERANCE else " **out of band**"
        lines.append(f"| {e.profile} | {e.concurrency} | {e.key} | {e.paper:.2f} | {e.ours:.2f} "
                     f"| {100 * e.error:+.1f}%{flag} |")
    return "\n".join(lines)


def compare(results_json: str) -> str:
    """Markdown: per measured direct cell and metric, paper / predicted / measured and the errors."""
    doc = json.loads(Path(results_json).read_text())
    lines = ["| profile | conc. | metric | paper | predicted | measured | measured vs predicted | "
             "measured vs paper |", "|---|---|---|---|---|---|---|---|"]
    for cell in doc["cells"]:
        if cell["target"] != "direct" or not cell["metrics"] or cell["profile"] not in PROFILES:
            continue
        prof, level = cell["profile"], cell["concurrency"]
        pred = predict(PROFILES[prof], synthetic(level, 0, prof), level)
        for key in (*FIT_KEYS, "total_output_tokens"):
            got, want = float(cell["metrics"][key]), pred[key]
            paper = paper_value(prof, level, key)
            vs_pred = f"{100 * (got - want) / want:+.1f}%" if want else "n/a"
            vs_paper = f"{100 * (got - paper) / paper:+.1f}%" if paper else "n/a"
            lines.append(f"| {prof} | {level} | {key} | {paper if paper is not None else 'n/a'} | {want:.2f} "
                         f"| {got:.2f} | {vs_pred} | {vs_paper} |")
    return "\n".join(lines)


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.compare:
        try:
            print(compare(args.compare))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"hpcgate bench calibrate: error: --compare {args.compare}: {exc!r}", file=sys.stderr)
            return 2
        return 0
    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    unknown = [n for n in names if not paper_levels(n)]
    if unknown or not names:
        print(f"hpcgate bench calibrate: error: the paper has cells for gpu-s and gpu-l only, got {names}",
              file=sys.stderr)
        return 2
    profiles, errors = [], []
    for name in names:
        prof = PROFILES[name]
        if args.fit:
            t0 = time.monotonic()
            prof = fit(prof, args.iters)
            print(f"fitted {name} in {time.monotonic() - t0:.0f} s: "
                  + ", ".join(f"{k}={getattr(prof, k):.4g}" for k in FIT_PARAMS), flush=True)
        profiles.append(prof)
        errors += predicted_errors(prof, (*FIT_KEYS, "total_output_tokens"))
    print(error_table(errors))
    worst = max(errors, key=lambda e: abs(e.error))
    print(f"\nworst: {worst.profile} c={worst.concurrency} {worst.key} {100 * worst.error:+.1f}% "
          f"(band ±{100 * TOLERANCE:.0f}%)")
    if args.fit and not args.no_write:
        fitted = {p.name: p for p in profiles}
        keep = [PROFILES[n] for n in ("gpu-s", "gpu-l") if n not in fitted]
        write_calibrated([*keep, *profiles])
        print(f"written: {CALIBRATED_PY}")
    return 0 if abs(worst.error) <= TOLERANCE else 1


if __name__ == "__main__":  # python -m bench.calibrate [...] = hpcgate bench calibrate [...]
    from bench.main import main

    raise SystemExit(main(["calibrate", *sys.argv[1:]]))
