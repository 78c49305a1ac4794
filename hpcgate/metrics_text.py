"""Sans-IO parsing of a vLLM ``/metrics`` page into the load figures routing, draining and scaling need.

The one Prometheus-text parser of the project: the gateway's scraper routes on it, the Job
Worker's in-flight probe (:mod:`control.jobs.inflight`) decides when a draining job is empty,
and the autoscaler reads queue time from the ``vllm:request_queue_time_seconds`` histogram's
``_sum`` and ``_count`` (summed over label sets; cumulative, so a caller takes their rate).

Accepts current and legacy metric names (``vllm:kv_cache_usage_perc`` and the older
``vllm:gpu_cache_usage_perc``). Running and waiting are summed over all label sets (several
engines or models in one server); KV-cache use is the maximum. A series that is absent stays
``None`` ("unknown"), never zero.

For cache-aware routing it also reads the KV cache's size from ``vllm:cache_config_info``
(``num_gpu_blocks`` x ``block_size`` tokens, summed over engines) and the prefix-cache counters
``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (tokens; vLLM V1 before
0.10 named them ``vllm:gpu_prefix_cache_*``), or the V0 gauge ``vllm:gpu_prefix_cache_hit_rate``.
"""

from __future__ import annotations

import msgspec

_RUNNING = b"vllm:num_requests_running"
_WAITING = b"vllm:num_requests_waiting"
_KV = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
# vLLM V1 and late V0 name; early V0 called the same histogram vllm:time_in_queue_requests.
_QT_SUM = (b"vllm:request_queue_time_seconds_sum", b"vllm:time_in_queue_requests_sum")
_QT_COUNT = (b"vllm:request_queue_time_seconds_count", b"vllm:time_in_queue_requests_count")
_CACHE_INFO = b"vllm:cache_config_info"
_QUERIES = (b"vllm:prefix_cache_queries_total", b"vllm:gpu_prefix_cache_queries_total")
_HITS = (b"vllm:prefix_cache_hits_total", b"vllm:gpu_prefix_cache_hits_total")
_HIT_RATE = b"vllm:gpu_prefix_cache_hit_rate"


class EngineLoad(msgspec.Struct, frozen=True):
    running: float | None
    waiting: float | None
    kv_usage: float | None
    queue_time_sum: float | None = None  # cumulative seconds spent waiting, scheduled requests
    queue_time_count: float | None = None  # cumulative count of scheduled requests
    kv_capacity_tokens: int | None = None  # the KV cache's size (cache_config_info)
    prefix_queries: float | None = None  # prefix-cache counters, tokens since the engine started
    prefix_hits: float | None = None
    prefix_hit_rate: float | None = None  # hits / queries (V0: the engine's own gauge)

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


def _label(line: bytes, name: bytes) -> bytes | None:
    i = line.find(b"," + name + b'="')
    if i < 0:
        i = line.find(b"{" + name + b'="')
    if i < 0:
        return None
    start = i + len(name) + 3
    end = line.find(b'"', start)
    return line[start:end] if end >= 0 else None


def _cache_tokens(line: bytes) -> int | None:
    blocks, size = _label(line, b"num_gpu_blocks"), _label(line, b"block_size")
    try:
        return int(blocks) * int(size) if blocks is not None and size is not None else None
    except ValueError:  # "None" before the engine has profiled its memory
        return None


def _add(total: float | None, v: float | None) -> float | None:
    return total if v is None else v if total is None else total + v


def parse_engine_load(text: bytes) -> EngineLoad:
    running: float | None = None
    waiting: float | None = None
    kv: float | None = None
    qt_sum: float | None = None
    qt_count: float | None = None
    capacity: int | None = None
    queries: float | None = None
    hits: float | None = None
    rate: float | None = None
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
            qt_sum = _add(qt_sum, _value(line))
        elif name in _QT_COUNT:
            qt_count = _add(qt_count, _value(line))
        elif name in _QUERIES:
            queries = _add(queries, _value(line))
        elif name in _HITS:
            hits = _add(hits, _value(line))
        elif name == _HIT_RATE:
            rate = _value(line)
        elif name == _CACHE_INFO:
            tokens = _cache_tokens(line)
            if tokens is not None:
                capacity = (capacity or 0) + tokens
    if queries is not None and hits is not None:
        rate = hits / queries if queries else 0.0
    return EngineLoad(running, waiting, kv, queue_time_sum=qt_sum, queue_time_count=qt_count,
                      kv_capacity_tokens=capacity, prefix_queries=queries, prefix_hits=hits,
                      prefix_hit_rate=rate)
