"""``hpcgate bench prefix``: cache-aware routing against least-queue on prefix-heavy workloads.

For each workload (:mod:`bench.conversations`) and each routing policy, the same setup starts
fresh: ``--instances`` simulator processes (prefix caching on, empty caches) behind one gateway
whose policy is set for the model, then ``--users`` clients run the workload's conversations
(each client one conversation at a time, turns in order, the received answer resent with the
history: a closed loop, so the offered load is the same number of users for both policies).
Measured per run: median and p99 TTFT (first content chunk), request throughput (requests over
the run's duration), errors, the engines' prefix-cache hit ratio (their own counters, summed)
and the router's estimate (the gateway's ``hpcgate_gateway_prefix_index_*`` counters). The
summary gives cache-aware over least-queue as ratios within the one run.

``--sglang-router PATH`` adds a third run with SGLang's router (the ``sglang-router`` package's
``sglang-router launch --policy cache_aware``, an approximate radix tree per worker) in place
of the gateway, in front of the same fresh simulators: a peer's cache-aware router on the same
workload. It is not a dependency of hpcgate; install it where you like and pass its path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvloop

from bench.conversations import WORKLOADS, ConversationWorkload, build
from hpcgate.metrics_text import parse_engine_load

if TYPE_CHECKING:  # the bench extra's packages are imported when the command runs
    import openai

    from bench.procs import Child

MODEL = "sim-model"
POLICIES = ("least-queue", "cache-aware")


class _Result:
    __slots__ = ("errors", "ttft")

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.errors: list[str] = []


async def _conversation(client: openai.AsyncOpenAI, wl: ConversationWorkload, index: int,
                        out: _Result) -> None:
    import openai

    conv = wl.conversations[index]
    messages: list[Any] = [{"role": "system", "content": conv.system}]
    for t, question in enumerate(conv.questions):
        if t and wl.think_s:
            await asyncio.sleep(wl.think_s)
        messages.append({"role": "user", "content": question})
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        try:
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=wl.answer_tokens, stream=True,
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.perf_counter() - start
                    parts.append(chunk.choices[0].delta.content)
        except openai.OpenAIError as exc:
            out.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return  # a conversation whose turn failed stops (its history is broken)
        if first is None:
            out.errors.append("no content")
            return
        out.ttft.append(first)
        messages.append({"role": "assistant", "content": "".join(parts)})


async def drive(base_url: str, wl: ConversationWorkload, users: int) -> dict[str, object]:
    """Run the workload with ``users`` concurrent clients; returns its measurements."""
    import openai

    out = _Result()
    pending = iter(range(len(wl.conversations)))
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600)

    async def user() -> None:
        for index in pending:
            await _conversation(client, wl, index, out)

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(users)))
    duration = time.perf_counter() - t0
    await client.close()
    ttft = sorted(out.ttft)
    return {"requests": wl.requests, "completed": len(ttft), "errors": len(out.errors),
            "error_samples": out.errors[:3], "duration_s": round(duration, 3),
            "request_throughput": round(len(ttft) / duration, 3),
            "median_ttft_ms": round(statistics.median(ttft) * 1000, 2) if ttft else None,
            "p99_ttft_ms": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1000, 2) if ttft else None}


_COUNTER = re.compile(rb"^(hpcgate_gateway_prefix_index_(?:query|hit)_tokens)_total\{[^}]*\} (\S+)$", re.M)


async def _scrape(url: str) -> bytes:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(url + "/metrics")).content


async def _start_sglang_router(path: str, urls: list[str]) -> Child:
    """SGLang's router in front of ``urls``; ready once it answers a chat completion."""
    from bench.procs import Child, free_port, stop

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        path, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
        "--policy", "cache_aware", "--log-level", "warn", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    child = Child("sglang-router", proc, "127.0.0.1", port)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ready"}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(150):
            try:
                if (await http.post(child.url + "/v1/chat/completions", json=body)).status_code == 200:
                    return child
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    await stop(child)
    raise RuntimeError("sglang-router did not answer within 30 s")


async def run_one(wl: ConversationWorkload, policy: str, *, instances: int, profile: str,
                  users: int, sglang_router: str | None = None) -> dict[str, object]:
    from bench.procs import start_gateway, start_sim, stop

    sims: list[Child] = []
    gateway: Child | None = None
    try:
        for _ in range(instances):
            sims.append(await start_sim(profile, MODEL))
        if policy == "sglang-router":
            assert sglang_router is not None
            gateway = await _start_sglang_router(sglang_router, [s.url for s in sims])
        else:
            gateway = await start_gateway(MODEL, ",".join(s.url for s in sims),
                                          extra_env={"HPCGATE_GATEWAY_ROUTING_POLICY": policy,
                                               "HPCGATE_GATEWAY_SCRAPE_INTERVAL_S": "0.5"})
            await asyncio.sleep(1.0)  # let the gateway scrape every instance once (KV-cache sizes)
        result = await drive(gateway.url, wl, users)
        queries = hits = 0.0
        per_instance = []
        share = []
        for s in sims:
            load = parse_engine_load(await _scrape(s.url))
            queries += load.prefix_queries or 0.0
            hits += load.prefix_hits or 0.0
            per_instance.append(round(load.prefix_hit_rate or 0.0, 3))
            share.append(load.prefix_queries or 0.0)
        page = await _scrape(gateway.url) if policy != "sglang-router" else b""
        counters = {m.group(1).decode(): float(m.group(2)) for m in _COUNTER.finditer(page)}
        routed = counters.get("hpcgate_gateway_prefix_index_query_tokens", 0.0)
        estimate = counters.get("hpcgate_gateway_prefix_index_hit_tokens", 0.0) / routed if routed else None
        return {**result, "policy": policy, "engine_hit_ratio": round(hits / queries, 3) if queries else 0.0,
                "engine_hit_ratio_per_instance": per_instance,
                "prompt_token_share_per_instance": [round(q / queries, 3) if queries else 0.0 for q in share],
                "router_hit_estimate": round(estimate, 3) if estimate is not None else None}
    finally:
        if gateway is not None:
            await stop(gateway)
        for s in sims:
            await stop(s)


async def run_prefix_bench(workloads: list[str], *, instances: int, profile: str, users: int,
                           scale: float, seed: int, sglang_router: str | None = None) -> dict[str, object]:
    from bench.driver import git_commit, machine

    load_before = os.getloadavg()
    rows = []
    for name in workloads:
        wl = build(name, seed=seed, scale=scale)
        policies = (*POLICIES, "sglang-router") if sglang_router else POLICIES
        runs = {p: await run_one(wl, p, instances=instances, profile=profile, users=users,
                                 sglang_router=sglang_router) for p in policies}
        base, aware = runs["least-queue"], runs["cache-aware"]
        ratios: dict[str, float | None] = {}
        if base["median_ttft_ms"] and aware["median_ttft_ms"]:
            ratios["median_ttft_lq_over_ca"] = round(
                base["median_ttft_ms"] / aware["median_ttft_ms"], 2)  # type: ignore[operator]
        if base["request_throughput"]:
            ratios["throughput_ca_over_lq"] = round(
                aware["request_throughput"] / base["request_throughput"], 2)  # type: ignore[operator]
        peer = runs.get("sglang-router")
        if peer is not None and peer["median_ttft_ms"] and aware["median_ttft_ms"]:
            ratios["median_ttft_sglang_over_ca"] = round(
                peer["median_ttft_ms"] / aware["median_ttft_ms"], 2)  # type: ignore[operator]
            ratios["throughput_ca_over_sglang"] = round(
                aware["request_throughput"] / peer["request_throughput"], 2)  # type: ignore[operator]
        rows.append({"workload": name, "description": wl.description, "runs": runs, "ratios": ratios})
    # other work on a shared machine starves the simulators' modelled clocks: say how busy it was
    return {"benchmark": "prefix", "commit": git_commit(), "machine": machine(),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "settings": {"instances": instances, "profile": profile, "users": users, "scale": scale,
                         "seed": seed, "sglang_router": sglang_router},
            "rows": rows}


def render(doc: dict[str, object]) -> str:
    lines = ["| workload | policy | median TTFT ms | p99 TTFT ms | req/s | errors | engine hit ratio | "
             "router estimate |", "|---|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:  # type: ignore[attr-defined]
        for policy, r in row["runs"].items():
            lines.append(f"| {row['workload']} | {policy} | {r['median_ttft_ms']} | {r['p99_ttft_ms']} | "
                         f"{r['request_throughput']} | {r['errors']} | {r['engine_hit_ratio']} | "
                         f"{r['router_hit_estimate'] if r['router_hit_estimate'] is not None else '-'} |")
    lines += ["", "| workload | median TTFT least-queue / cache-aware | throughput cache-aware / least-queue "
              "| median TTFT sglang-router / cache-aware | throughput cache-aware / sglang-router |",
              "|---|---|---|---|---|"]
    for row in doc["rows"]:  # type: ignore[attr-defined]
        ratios = row["ratios"]
        lines.append(f"| {row['workload']} | {ratios.get('median_ttft_lq_over_ca')} | "
                     f"{ratios.get('throughput_ca_over_lq')} | "
                     f"{ratios.get('median_ttft_sglang_over_ca', '-')} | "
                     f"{ratios.get('throughput_ca_over_sglang', '-')} |")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("prefix", help="cache-aware routing vs least-queue on prefix-heavy workloads")
    p.add_argument("--workload", action="append", choices=WORKLOADS,
                   help="repeatable (default: all three)")
    p.add_argument("--instances", type=int, default=4, help="simulator instances (default 4)")
    p.add_argument("--profile", default="gpu-l", choices=["fast", "paced", "gpu-s", "gpu-l"],
                   help="simulator profile (default gpu-l)")
    p.add_argument("--users", type=int, default=32, help="concurrent clients, the offered load (default 32)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the conversations of each workload")
    p.add_argument("--seed", type=int, default=0, help="shifts the words of every workload (default 0)")
    p.add_argument("--sglang-router", metavar="PATH",
                   help="also run SGLang's router (sglang-router launch --policy cache_aware) at PATH")
    p.add_argument("--result-file", help="JSON results (default: RESULTS_DIR/prefix-TIMESTAMP.json)")


def cmd_prefix(args: argparse.Namespace, results_dir: str) -> int:
    if args.instances < 1 or args.users < 1 or args.scale <= 0:
        print("hpcgate bench prefix: error: --instances and --users must be >= 1, --scale > 0")
        return 2
    doc = uvloop.run(run_prefix_bench(args.workload or list(WORKLOADS), instances=args.instances,
                                      profile=args.profile, users=args.users, scale=args.scale,
                                      seed=args.seed, sglang_router=args.sglang_router))
    print(render(doc))
    path = Path(args.result_file or Path(results_dir) / f"prefix-{time.strftime('%Y%m%dT%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {path}")
    failed = any(r["errors"] for row in doc["rows"] for r in row["runs"].values())  # type: ignore[attr-defined]
    return 1 if failed else 0
