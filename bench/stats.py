"""Aggregate per-request records into vLLM ``bench serve`` metrics (pure).

Definitions (see shared/reference/vllm-bench-metrics.md, ``calculate_metrics``): only
successful requests count; TPOT per request is ``(e2el - ttft) / (output_tokens - 1)`` for
requests with more than one output token; ITL pools every per-chunk gap of every request;
mean/median/std/percentiles are ``np.mean``/``np.median``/``np.std`` (ddof 0)/
``np.percentile`` (linear), in ms; an empty list gives 0; throughputs divide by the
wall-clock duration of the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np


class RequestRecord(msgspec.Struct, kw_only=True):
    """One request as measured by the driver (seconds)."""

    index: int
    prompt_len: int
    max_tokens: int
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0          # E2EL
    output_tokens: int = 0
    itl: list[float] = msgspec.field(default_factory=list)
    start: float = 0.0            # perf_counter offset from the run's start
    error: str = ""


def summarize(values: Sequence[float], percentiles: Sequence[float] = (99.0,)) -> dict[str, float]:
    """``mean``, ``median``, ``std`` and ``p<p>`` in ms of values given in seconds."""
    if not values:
        out = {"mean": 0.0, "median": 0.0, "std": 0.0}
        out.update({f"p{_pct_name(p)}": 0.0 for p in percentiles})
        return out
    arr = np.asarray(values, dtype=float) * 1000.0
    out = {"mean": float(np.mean(arr)), "median": float(np.median(arr)), "std": float(np.std(arr))}
    out.update({f"p{_pct_name(p)}": float(np.percentile(arr, p)) for p in percentiles})
    return out


def _pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def calculate_metrics(records: Sequence[RequestRecord], duration: float,
                      percentiles: Sequence[float] = (99.0,)) -> dict[str, object]:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    dur = duration if duration > 0 else float("nan")
    metrics: dict[str, object] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots), ("itl", itls),
                         ("e2el", [r.latency for r in ok])):
        for stat, value in summarize(values, percentiles).items():
            metrics[f"{stat}_{name}_ms"] = value
    return metrics
