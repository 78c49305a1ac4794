"""Sans-IO parsing of a vLLM ``/metrics`` page into the load figures routing, draining and scaling need.

The one Prometheus-text parser of the project: the gateway's scraper routes on it, the Job
Worker's in-flight probe (:mod:`control.jobs.inflight`) decides when a draining job is empty,
and the autoscaler reads queue time from the ``vllm:request_queue_time_seconds`` histogram's
``_sum`` and ``_count`` (summed over label sets; cumulative, so a caller takes their rate).

Accepts current and legacy metric names (``vllm:kv_cache_usage_perc`` and the older
``vllm:gpu_cache_usage_perc``). Running and waiting are summed over all label sets (several
engines or models in one server); KV-cache use is the maximum. A series that is absent stays
``None`` ("unknown"), never zero.
"""

from __future__ import annotations

import msgspec

_RUNNING = b"vllm:num_requests_running"
_WAITING = b"vllm:num_requests_waiting"
_KV = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
# vLLM V1 and late V0 name; early V0 called the same histogram vllm:time_in_queue_requests.
_QT_SUM = (b"vllm:request_queue_time_seconds_sum", b"vllm:time_in_queue_requests_sum")
_QT_COUNT = (b"vllm:request_queue_time_seconds_count", b"vllm:time_in_queue_requests_count")


class EngineLoad(msgspec.Struct, frozen=True):
    running: float | None
    waiting: float | None
    kv_usage: float | None
    queue_time_sum: float | None = None  # cumulative seconds spent waiting, scheduled requests
    queue_time_count: float | None = None  # cumulative count of scheduled requests

    @property
    def queue(self) -> float | None:
        if self.running is None and self.waiting is None:
            return None
        return (self.running or 0.0) + (self.waiting or 0.0)


def _value(line: bytes) -> float | None:
    # "name{labels} value [timestamp]": the value follows the closing brace (labels may hold spaces)
    brace = line.rfind(b"}")
    rest = line[brace + 1:] if brace >= 0 else line.split(b" ", 1)[1] if b" " in line else b""
    parts = rest.split()
    if not parts:
        return None
    try:
        return float(parts[0])
    except ValueError:
        return None


def parse_engine_load(text: bytes) -> EngineLoad:
    running: float | None = None
    waiting: float | None = None
    kv: float | None = None
    qt_sum: float | None = None
    qt_count: float | None = None
    for line in text.split(b"\n"):
        if not line.startswith(b"vllm:"):
            continue
        name_end = min((i for i in (line.find(b"{"), line.find(b" ")) if i >= 0), default=len(line))
        name = line[:name_end]
        if name == _RUNNING:
            v = _value(line)
            if v is not None:
                running = (running or 0.0) + v
        elif name == _WAITING:
            v = _value(line)
            if v is not None:
                waiting = (waiting or 0.0) + v
        elif name in _KV:
            v = _value(line)
            if v is not None:
                kv = v if kv is None else max(kv, v)
        elif name in _QT_SUM:
            v = _value(line)
            if v is not None:
                qt_sum = (qt_sum or 0.0) + v
        elif name in _QT_COUNT:
            v = _value(line)
            if v is not None:
                qt_count = (qt_count or 0.0) + v
    return EngineLoad(running, waiting, kv, qt_sum, qt_count)
