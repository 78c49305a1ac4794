"""The simulator's ``/metrics``: vLLM's Prometheus names and labels, one registry per instance.

Current names (vLLM V1): ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` (0..1), ``vllm:num_preemptions_total``,
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:request_success_total{finished_reason=stop|length|abort}`` and the histograms
``vllm:request_queue_time_seconds``, ``vllm:time_to_first_token_seconds``,
``vllm:e2e_request_latency_seconds``; every series carries ``model_name`` (the first served
name) and ``engine="0"``. With ``legacy=True`` the V0 names are emitted instead:
``vllm:gpu_cache_usage_perc`` for the KV-cache gauge and no ``engine`` label.

Prefix caching (:mod:`bench.sim.prefix_cache`): the counters ``vllm:prefix_cache_queries_total``
and ``vllm:prefix_cache_hits_total`` (tokens; V0: the cumulative ratio as the gauge
``vllm:gpu_prefix_cache_hit_rate``), and ``vllm:cache_config_info``, a gauge of value 1 whose
labels carry the cache configuration as strings (``block_size``, ``num_gpu_blocks``,
``enable_prefix_caching``, ...), so a router can size its view of the instance from a scrape.

Gauges are read from the engine at scrape time (no per-step gauge updates); histogram and
counter children are bound once, so the hot path does one ``observe``/``inc`` per event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bench.sim.engine import Seq

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class CacheInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The KV cache's configuration and prefix-cache counters, read at scrape time."""

    block_size: int
    num_gpu_blocks: int
    enabled: bool
    queries: int
    hits: int


class _Cache(Collector):
    def __init__(self, labels: dict[str, str], legacy: bool, read: Callable[[], CacheInfo]) -> None:
        self._labels = labels
        self._legacy = legacy
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        info = self._read()
        names, values = list(self._labels), list(self._labels.values())
        # vLLM: CacheConfig.metrics_info(), every value as str(), plus the engine label (V1)
        config = {"block_size": str(info.block_size), "cache_dtype": "auto",
                  "enable_prefix_caching": str(info.enabled), "gpu_memory_utilization": "0.9",
                  "num_gpu_blocks": str(info.num_gpu_blocks)}
        if not self._legacy:
            config["engine"] = self._labels["engine"]
        fam = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                labels=list(config))
        fam.add_metric(list(config.values()), 1.0)
        yield fam
        if self._legacy:
            rate = GaugeMetricFamily("vllm:gpu_prefix_cache_hit_rate", "GPU prefix cache block hit rate.",
                                     labels=names)
            rate.add_metric(values, info.hits / info.queries if info.queries else 0.0)
            yield rate
            return
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             info.queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", info.hits),
        ):
            counter = CounterMetricFamily(name, doc, labels=names)
            counter.add_metric(values, float(value))
            yield counter


class _Gauges(Collector):
    def __init__(self, labels: dict[str, str], legacy: bool,
                 read: Callable[[], tuple[int, int, float]]) -> None:
        self._labels = labels
        self._legacy = legacy
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, waiting, kv = self._read()
        names, values = list(self._labels), list(self._labels.values())
        kv_name = "vllm:gpu_cache_usage_perc" if self._legacy else "vllm:kv_cache_usage_perc"
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            (kv_name, "KV-cache usage. 1 means 100 percent usage.", kv),
        ):
            fam = GaugeMetricFamily(name, doc, labels=names)
            fam.add_metric(values, float(value))
            yield fam


class SimMetrics:
    """Implements the engine's Observer and renders the exposition text."""

    def __init__(self, model_name: str, legacy: bool,
                 read_gauges: Callable[[], tuple[int, int, float]],
                 read_cache: Callable[[], CacheInfo]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = {"model_name": model_name} if legacy else {"model_name": model_name, "engine": "0"}
        names, values = list(labels), list(labels.values())
        reg = self.registry
        self.registry.register(_Gauges(labels, legacy, read_gauges))
        self.registry.register(_Cache(labels, legacy, read_cache))

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=reg).labels(*values)

        self._queue = hist("vllm:request_queue_time_seconds",
                           "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS)
        self._ttft = hist("vllm:time_to_first_token_seconds",
                          "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self._e2e = hist("vllm:e2e_request_latency_seconds",
                         "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS)
        self._prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", names,
                               registry=reg).labels(*values)
        self._generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                   names, registry=reg).labels(*values)
        self._preemptions = Counter("vllm:num_preemptions",
                                    "Cumulative number of preemption from the engine.",
                                    names, registry=reg).labels(*values)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*names, "finished_reason"], registry=reg)
        self._success = {r: success.labels(*values, r) for r in FINISH_REASONS}

    # --- Observer ------------------------------------------------------------------------
    def on_first_scheduled(self, seq: Seq, now: float) -> None:
        self._queue.observe(now - seq.arrival)

    def on_first_token(self, seq: Seq, now: float) -> None:
        self._ttft.observe(now - seq.arrival)

    def on_finished(self, seq: Seq, reason: str, now: float) -> None:
        self._e2e.observe(now - seq.arrival)
        self._success[reason].inc()

    def on_step(self, prefill_tokens: int, generated_tokens: int, preempted: int) -> None:
        if prefill_tokens:
            self._prompt.inc(prefill_tokens)
        if generated_tokens:
            self._generation.inc(generated_tokens)
        if preempted:
            self._preemptions.inc(preempted)

    def on_abort(self, seq: Seq, now: float) -> None:
        self._e2e.observe(now - seq.arrival)
        self._success["abort"].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
