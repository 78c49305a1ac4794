"""``hpcgate bench overhead``: what a proxy costs on the data plane (issue 4, "Performance").

One run, one simulator upstream (profile ``paced`` by default: 20 ms per step for any batch,
i.e. 50 tokens/s per stream like a GPU decoding, max_num_seqs 1024, so the engine never
queues; ``--upstream-profile fast`` streams as fast as the CPU allows, which saturates any
proxy on a small machine), 64-token streams (``ignore_eos``), concurrency levels 100/500/1000 (each
level sends 3x its concurrency in requests), targets direct / gateway / nginx. Per target and
level: CPU seconds of the proxy's whole process tree (gateway workers; nginx master and
workers) per 1000 requests (each level after an unmeasured warm-up of ``level`` 1-token
requests at that concurrency, so every proxy's upstream keep-alive pool is open, as in steady
service; ``--no-warmup`` measures the connects too), TTFT p50/p99 and the TTFT added over
direct, request throughput and its via/direct ratio, errors, peak RSS per proxy process.

The machine has 2 cores: the driver pins itself to CPU 0 after starting the children (which
keep both CPUs), so the driver competes with them as little as it can; read the results as
ratios measured in one run, never as absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import uvloop

from bench import procs
from bench.driver import RunSettings, git_commit, machine, run_benchmark
from bench.workload import Workload

MODEL = "sim-model"
PROMPT_TOKENS = 100


def _workload(n: int, tokens: int) -> Workload:
    return Workload(name="overhead", source=f"{n} x ({PROMPT_TOKENS} prompt, {tokens} output tokens)",
                    prompt_lens=[PROMPT_TOKENS] * n, output_lens=[tokens] * n)


async def run_overhead(levels: list[int], targets: list[str], tokens: int, per_level: int | None,
                       gateway_workers: int, *, upstream: str = "paced",
                       warmup: bool = True) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    sim = await procs.start_sim(upstream, MODEL, "--max-num-seqs", "1024")
    try:
        # The simulator's own first run (allocations, first code paths) would cost the first target
        # measured, whichever it is (+20 ms TTFT p99 at 100 streams): one unmeasured run at it first,
        # with or without --warmup (which is about the proxies' connection pools).
        top = max(levels)
        await run_benchmark(RunSettings(base_url=sim.url, model=MODEL, num_prompts=top, max_concurrency=top,
                                        ignore_eos=True, label="simulator warm-up"), _workload(top, tokens))
        for target in targets:
            try:
                proxy = await procs.start_proxy(target, MODEL, sim, gateway_workers)
            except procs.TargetUnavailableError as exc:
                rows += [{"target": target, "concurrency": lv, "error": str(exc)} for lv in levels]
                continue
            try:
                if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
                    os.sched_setaffinity(0, {0})
                for level in levels:
                    n = per_level or 3 * level
                    settings = RunSettings(base_url=proxy.url if proxy else sim.url, model=MODEL,
                                           num_prompts=n, max_concurrency=level, ignore_eos=True,
                                           label=f"{target} c={level}")
                    if warmup:  # not measured: `level` upstream connections opened and pooled
                        await run_benchmark(RunSettings(base_url=settings.base_url, model=MODEL,
                                                        num_prompts=level, max_concurrency=level,
                                                        ignore_eos=True, label=f"{target} warm-up"),
                                            _workload(level, 1))
                    done = asyncio.Event()
                    sampler = asyncio.create_task(procs.sample_rss_until([proxy] if proxy else [], done))
                    cpu0 = proxy.cpu_seconds() if proxy else 0.0
                    sim_cpu0 = sim.cpu_seconds()
                    doc = await run_benchmark(settings, _workload(n, tokens))
                    cpu = (proxy.cpu_seconds() - cpu0) if proxy else None
                    sim_cpu = sim.cpu_seconds() - sim_cpu0
                    done.set()
                    await sampler
                    m = doc["metrics"]
                    assert isinstance(m, dict)
                    rows.append({
                        "target": target, "concurrency": level, "requests": n,
                        "completed": m["completed"], "failed": m["failed"],
                        "proxy_cpu_s_per_1000": None if cpu is None else cpu * 1000 / n,
                        "sim_cpu_s_per_1000": sim_cpu * 1000 / n,
                        "ttft_p50_ms": m["median_ttft_ms"], "ttft_p99_ms": m["p99_ttft_ms"],
                        "request_throughput": m["request_throughput"],
                        "driver_cpu_s": doc["driver_cpu_s"],
                        "peak_rss_mb": ({str(pid): rss / 2**20 for pid, rss in proxy.peak_rss.items()}
                                        if proxy else {}),
                        "errors": doc["errors"],
                    })
                    print(f"[overhead] {target} c={level}: p50 TTFT {m['median_ttft_ms']:.2f} ms, "
                          f"{m['request_throughput']:.1f} req/s, failed {m['failed']}", flush=True)
            finally:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
                if proxy is not None:
                    await procs.stop(proxy)
    finally:
        await procs.stop(sim)
    direct = {r["concurrency"]: r for r in rows if r["target"] == "direct" and "error" not in r}
    for r in rows:
        d = direct.get(r["concurrency"])
        if d is None or "error" in r:
            continue
        r["added_ttft_p50_ms"] = float(r["ttft_p50_ms"]) - float(d["ttft_p50_ms"])  # type: ignore[arg-type]
        r["added_ttft_p99_ms"] = float(r["ttft_p99_ms"]) - float(d["ttft_p99_ms"])  # type: ignore[arg-type]
        r["throughput_ratio"] = float(r["request_throughput"]) / float(d["request_throughput"])  # type: ignore[arg-type]
    return rows


def render(rows: list[dict[str, object]]) -> str:
    out = ["| target | conc. | requests | failed | proxy CPU s / 1000 req | sim CPU s / 1000 req "
           "| TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | added TTFT p99 ms | req/s | via/direct "
           "| peak RSS MB / process |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['target']} | {r['concurrency']} | {r['error']} |" + " |" * 10)
            continue

        def f(key: str, fmt: str = "{:.2f}", r: dict[str, object] = r) -> str:
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "—"

        rss = r.get("peak_rss_mb") or {}
        assert isinstance(rss, dict)
        rss_s = ", ".join(f"{v:.0f}" for v in rss.values()) or "—"
        out.append(f"| {r['target']} | {r['concurrency']} | {r['requests']} | {r['failed']} "
                   f"| {f('proxy_cpu_s_per_1000', '{:.3f}')} | {f('sim_cpu_s_per_1000', '{:.3f}')} "
                   f"| {f('ttft_p50_ms')} | {f('ttft_p99_ms')} "
                   f"| {f('added_ttft_p50_ms', '{:+.2f}')} | {f('added_ttft_p99_ms', '{:+.2f}')} "
                   f"| {f('request_throughput', '{:.1f}')} | {f('throughput_ratio', '{:.3f}')} | {rss_s} |")
    return "\n".join(out)


def cmd_overhead(args: argparse.Namespace, results_dir: str) -> int:
    levels = [4, 16] if args.quick else [int(x) for x in args.concurrency.split(",") if x.strip()]
    per_level = args.requests_per_level or (20 if args.quick else None)
    tokens = min(args.tokens, 8) if args.quick else args.tokens  # quick: seconds, not minutes
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    rows = uvloop.run(run_overhead(levels, targets, tokens, per_level, args.gateway_workers,
                                   upstream=args.upstream_profile, warmup=args.warmup))
    out_dir = Path(args.out_dir or Path(results_dir) / f"overhead-{time.strftime('%Y%m%dT%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render(rows)
    header = (f"Commit `{git_commit()}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{machine()['cpu_count']} CPUs; upstream: hpcgate sim ({args.upstream_profile}, "
              "max_num_seqs 1024); "
              f"{tokens}-token streams (ignore_eos); driver pinned to CPU 0; "
              + ("each level after an unmeasured warm-up of `level` 1-token requests (pools open)."
                 if args.warmup else "no warm-up (upstream connects inside the measurement)."))
    (out_dir / "overhead.md").write_text(header + "\n\n" + md + "\n")
    (out_dir / "overhead.json").write_text(json.dumps({"header": header, "machine": machine(),
                                                       "git_commit": git_commit(), "rows": rows}, indent=1))
    print(header + "\n\n" + md)
    print(f"\nwritten: {out_dir}/overhead.md overhead.json")
    return 0 if all("error" not in r and not r.get("failed") for r in rows if r["target"] == "direct") else 1
