"""``hpcgate bench run``: the streaming load driver, measuring as vLLM's ``bench serve`` does.

Traffic: every request becomes eligible at its arrival time (all at t=0 with an infinite
rate; otherwise Gamma(burstiness) gaps rescaled so the last arrival is at N/rate, seeded),
then waits for a slot of ``max_concurrency``; its timer starts only when it has the slot
(client-side queueing is excluded from TTFT/E2EL, included in the duration). One warm-up
request (request 0's prompt and length) runs before timing and is not counted.

Payload (as vLLM's): completions ``{"model","prompt","max_tokens","temperature":0,
"repetition_penalty":1.0,"stream":true,"stream_options":{"include_usage":true}}``; chat
uses ``messages`` and ``max_completion_tokens``; ``ignore_eos`` when asked.
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import numpy as np

from bench.client import StreamClient
from bench.stats import RequestRecord, calculate_metrics
from bench.workload import Workload

ROOT = Path(__file__).resolve().parents[1]


class RunSettings(msgspec.Struct, frozen=True, kw_only=True):
    base_url: str                      # http://host:port (no /v1)
    model: str = "sim-model"
    endpoint: str = "completions"      # or "chat"
    num_prompts: int = 100
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    burstiness: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    api_key: str | None = None
    timeout_s: float | None = None     # per request; None like vLLM's default (6 h)
    label: str = ""
    backend: str = ""                  # what answered, e.g. "hpcgate sim, profile fast" (describe_backend)


class _VersionView(msgspec.Struct):
    version: str = ""
    engine: str = ""
    profile: str = ""


def describe_backend(base_url: str, api_key: str | None = None) -> str:
    """What serves ``base_url``, from its ``/version``: the simulator names itself and its profile
    (``hpcgate sim, profile fast``), vLLM its version; anything else is said to be unknown."""
    request = urllib.request.Request(base_url + "/version")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            view = msgspec.json.decode(answer.read(), type=_VersionView)
    except (OSError, ValueError, msgspec.DecodeError):  # HTTPError is an OSError
        return "unknown (no /version answer; name it with --backend)"
    if view.engine:
        return f"{view.engine}, profile {view.profile}" if view.profile else view.engine
    return f"vLLM {view.version}" if view.version else "unknown (name it with --backend)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> dict[str, object]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "processor": platform.processor() or platform.machine()}


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send offsets (s): zeros for an infinite rate, else Gamma gaps rescaled to end at n/rate."""
    if rate == float("inf") or n == 0:
        return [0.0] * n
    rng = np.random.RandomState(seed)
    theta = 1.0 / (rate * burstiness)
    gaps = rng.gamma(shape=burstiness, scale=theta, size=n)
    cum = np.cumsum(gaps)
    cum = cum * ((n / rate) / cum[-1])
    return [0.0, *(float(x) for x in cum[:-1])]


def build_body(s: RunSettings, prompt: str, max_tokens: int) -> bytes:
    payload: dict[str, object] = {"model": s.model, "temperature": 0.0, "repetition_penalty": 1.0,
                                  "stream": True, "stream_options": {"include_usage": True}}
    if s.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
        payload["max_completion_tokens"] = max_tokens
    else:
        payload["prompt"] = prompt
        payload["max_tokens"] = max_tokens
    if s.ignore_eos:
        payload["ignore_eos"] = True
    return msgspec.json.encode(payload)


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def tick(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            width = 30
            filled = int(width * self.done / max(1, self.total))
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def run_benchmark(settings: RunSettings, workload: Workload,
                        progress: bool | None = None) -> dict[str, object]:
    """Run the workload against ``settings.base_url``; returns the results document."""
    url = urlsplit(settings.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    n = min(settings.num_prompts, len(workload))
    path = "/v1/chat/completions" if settings.endpoint == "chat" else "/v1/completions"
    chat = settings.endpoint == "chat"
    client = StreamClient(host, port, api_key=settings.api_key)
    bodies = [build_body(settings, workload.prompt(i), workload.output_lens[i]) for i in range(n)]
    try:
        warm = RequestRecord(index=-1, prompt_len=workload.prompt_lens[0], max_tokens=workload.output_lens[0])
        await client.post_stream(path, bodies[0], warm, chat=chat, timeout=600)
        if not warm.success:
            raise RuntimeError(f"warm-up request failed: {warm.error}")

        records = [RequestRecord(index=i, prompt_len=workload.prompt_lens[i],
                                 max_tokens=workload.output_lens[i]) for i in range(n)]
        offsets = arrival_times(n, settings.request_rate, settings.burstiness, settings.seed)
        limit = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
        bar = Progress(n, settings.label or "bench", progress)
        cpu0, ru0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = records[i]
            rec.start = time.perf_counter() - t0
            if limit is None:
                await client.post_stream(path, bodies[i], rec, chat=chat, request_id=f"benchmark-serving{i}",
                                         timeout=settings.timeout_s)
            else:
                async with limit:
                    rec.start = time.perf_counter() - t0
                    await client.post_stream(path, bodies[i], rec, chat=chat,
                                             request_id=f"benchmark-serving{i}", timeout=settings.timeout_s)
            bar.tick()

        await asyncio.gather(*(one(i) for i in range(n)))
        duration = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        client.close()
    metrics = calculate_metrics(records, duration)
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    return {
        "workload": workload.name,
        "workload_source": workload.source,
        "git_commit": git_commit(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": msgspec.to_builtins(settings),
        "metrics": metrics,
        "driver_cpu_s": cpu,
        "driver_cpu_user_s": ru1.ru_utime - ru0.ru_utime,
        "driver_cpu_sys_s": ru1.ru_stime - ru0.ru_stime,
        "errors": errors,
        "requests": msgspec.to_builtins(records),
    }


def format_report(doc: dict[str, object]) -> str:
    """vLLM-style text summary."""
    m = doc["metrics"]
    assert isinstance(m, dict)
    s = doc["settings"]
    assert isinstance(s, dict)
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="),
             f"{'Backend:':<40}{s.get('backend') or 'unknown'}",
             f"{'Workload:':<40}{doc['workload']}"
             + ("  (SYNTHETIC, not BurstGPT)" if doc["workload"] == "synthetic" else ""),
             f"{'Successful requests:':<40}{m['completed']}",
             f"{'Failed requests:':<40}{m['failed']}"]
    if s.get("max_concurrency"):
        lines.append(f"{'Maximum request concurrency:':<40}{s['max_concurrency']}")
    lines += [f"{'Benchmark duration (s):':<40}{m['duration']:.2f}",
              f"{'Total input tokens:':<40}{m['total_input_tokens']}",
              f"{'Total generated tokens:':<40}{m['total_output_tokens']}",
              f"{'Request throughput (req/s):':<40}{m['request_throughput']:.2f}",
              f"{'Output token throughput (tok/s):':<40}{m['output_throughput']:.2f}",
              f"{'Total Token throughput (tok/s):':<40}{m['total_token_throughput']:.2f}"]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^60}".format(s=title, c="-"))
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("std", "Std"), ("p99", "P99")):
            lines.append(f"{f'{name} {key.upper()} (ms):':<40}{m[f'{stat}_{key}_ms']:.2f}")
    lines.append(f"{'Driver CPU time (s):':<40}{doc['driver_cpu_s']:.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)
