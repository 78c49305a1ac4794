"""``hpcgate bench day``: a compressed day of diurnal load against autoscaled and static allocations.

Each configuration gets a stack of its own (``bench/scaling_stack.py``: fresh database, control
api, Endpoint Worker, Job Worker, one gateway worker, the autoscaler) and one model on simulated
engines (the ``paced`` profile, ``--max-num-seqs`` sequences at a time, so one instance serves a
few requests per second and the load needs several). The day's 24 hours are played in
``--day-minutes`` of wall time: the request rate follows :data:`bench.day_plan.LOAD_SHAPE` by
the day's hour (the same seeded arrivals for every configuration) and the autoscaler's schedule
clock (``schedule_clock_*`` settings) runs at the same compression from midnight of ``--date``
in ``--tz``. Engines, requests and the autoscaler's windows stay in wall time: a request waits
what it waits; only the day's hours are compressed.

Configurations (``--configs``, in order; the first is the table's reference):

- ``static``: min = max = desired = ``--max-instances`` all day (a reservation for the peak);
- ``autoscaled``: min 0, max ``--max-instances``, the autoscaler (queue-time rule, idle
  scale-down, scale from zero);
- ``scheduled``: the same plus ``--schedule`` (default: two instances through working hours).

Measured per configuration: GPU-hours (the jobs' start to end, in the day's hours), requests and
failures (non-200 or a cut stream, as the client sees them), the engines' queue time (p95 from
``vllm:request_queue_time_seconds``'s buckets, PromQL-style, and the mean), the client's p95
TTFT (it includes a request's hold in the gateway while a model is at zero), and the scaling
decisions by reason. A sampler records load, desired, ready and pending instances every second;
the plot shows them over the day. Output: ``results.json``, ``summary.md`` and ``day.png`` in
``--out-dir``. A benchmark, never a test (``tests/bench/test_day.py`` runs a one-minute day).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from bench.bench_db import ADMIN_DSN
from bench.day_plan import (
    DAY_S,
    ConfigResult,
    HistogramSum,
    JobSpan,
    arrivals,
    gpu_seconds,
    percentile,
    rate_at,
    summary_table,
)
from bench.scaling_stack import Stack, rows, scaling_stack
from control.autoscale.schedule import ScheduleError
from control.autoscale.schedule import parse as parse_schedule

if TYPE_CHECKING:  # the load driver needs the bench extra (numpy): imported when a day runs
    from bench.stats import RequestRecord

MODEL = "day-bench"
CONFIGS = ("static", "autoscaled", "scheduled")
QUEUE_METRIC = "vllm:request_queue_time_seconds"
DEFAULT_SCHEDULE = "weekdays 08:00-17:00 Europe/Berlin: min 3"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("day", help="a compressed day of diurnal load: autoscaled vs a static allocation")
    p.add_argument("--day-minutes", type=float, default=12.0, help="wall minutes for 24 h (default 12)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument(
        "--peak-rps", type=float, default=12.0, help="requests per second at the peak (default 12)"
    )
    p.add_argument(
        "--max-instances", type=int, default=4, help="max instances; static runs this many (default 4)"
    )
    p.add_argument("--max-num-seqs", type=int, default=4, help="engine batch size of the sim (default 4)")
    p.add_argument("--tokens", type=int, default=40, help="tokens per response (default 40)")
    p.add_argument(
        "--schedule", default=DEFAULT_SCHEDULE, help=f"the scheduled config's (default {DEFAULT_SCHEDULE!r})"
    )
    p.add_argument("--date", default="2026-12-01", help="the day played, YYYY-MM-DD (default a Tuesday)")
    p.add_argument(
        "--tz", default="Europe/Berlin", help="the load pattern's time zone (default Europe/Berlin)"
    )
    p.add_argument(
        "--threshold-s", type=float, default=5.0, help="scale_up_queue_time_s (default 5, the paper's)"
    )
    p.add_argument("--sustain-s", type=float, default=10.0, help="scale_up_sustain_s (default 10)")
    p.add_argument("--window-s", type=float, default=10.0, help="queue_time_window_s (default 10)")
    p.add_argument("--stabilise-s", type=float, default=30.0, help="scale_down_stabilise_s (default 30)")
    p.add_argument(
        "--scale-down-running",
        type=float,
        default=2.0,
        help="scale_down_running_per_instance (default 2, half the batch; the product's default is 1)",
    )
    p.add_argument("--cooldown-s", type=float, default=10.0, help="cooldown_s (default 10)")
    p.add_argument("--interval-s", type=float, default=2.0, help="autoscaler pass interval (default 2)")
    p.add_argument(
        "--hold-s", type=float, default=60.0, help="scale-from-zero hold in the gateway (default 60)"
    )
    p.add_argument("--seed", type=int, default=0, help="arrivals' seed (default 0)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local", help="default local")
    p.add_argument("--admin-dsn", default=ADMIN_DSN, help="PostgreSQL server (a database per config)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis server")
    p.add_argument(
        "--out-dir", help="where results.json, summary.md and day.png go (default <results_dir>/day-<time>)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip day.png (matplotlib is the bench extra)")


class Sample(msgspec.Struct, array_like=True):
    t: float  # wall seconds since the day began
    desired: int
    ready: int
    pending: int  # submitted or loading: on the way
    draining: int
    queue_mean_s: float | None  # engines' mean queue time since the previous sample


def check_args(args: argparse.Namespace) -> list[str]:
    """Validated configuration names; raises ValueError with the reason."""
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if not configs or unknown:
        raise ValueError(
            f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}"
        )
    if args.day_minutes <= 0 or args.peak_rps <= 0 or args.max_instances < 1 or args.max_num_seqs < 1:
        raise ValueError("--day-minutes and --peak-rps must be > 0, --max-instances and --max-num-seqs >= 1")
    try:
        ZoneInfo(args.tz)
        date.fromisoformat(args.date)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"--tz / --date: {exc}") from None
    if "scheduled" in configs:
        try:
            parse_schedule(args.schedule)
        except ScheduleError as exc:
            raise ValueError(f"--schedule: {exc}") from None
    return configs


def day_start(args: argparse.Namespace) -> datetime:
    return datetime.combine(date.fromisoformat(args.date), datetime.min.time(), ZoneInfo(args.tz))


def _histogram(text: str, name: str) -> tuple[dict[float, float], float, float] | None:
    """One histogram's cumulative buckets, sum and count from a /metrics page (None: absent)."""
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        buckets: dict[float, float] = {}
        total = count = 0.0
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets[float(sample.labels["le"])] = (
                    buckets.get(float(sample.labels["le"]), 0.0) + sample.value
                )
            elif sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        return buckets, total, count
    return None


_STATE = """SELECT m.desired_instances AS desired,
                   count(*) FILTER (WHERE j.state = 'ready') AS ready,
                   count(*) FILTER (WHERE j.state IN ('pending', 'submitted', 'registered')) AS pending,
                   count(*) FILTER (WHERE j.state IN ('draining', 'cancelling')) AS draining
              FROM ai_model_configurations m LEFT JOIN ai_model_endpoint_jobs j USING (model_id)
             WHERE m.name = $1 GROUP BY m.desired_instances"""
_LIVE = """SELECT e.endpoint_id, e.node, e.port, e.bearer_token FROM ai_model_endpoints e
             JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
            WHERE j.state NOT IN ('ended', 'failed')"""
_SPANS = """SELECT extract(epoch FROM registered_at)::float8 AS started,
                   extract(epoch FROM ended_at)::float8 AS ended
              FROM ai_model_endpoint_jobs"""
_DECISIONS = """SELECT extract(epoch FROM decided_at)::float8 AS at, from_instances, to_instances,
                         reason, source FROM ai_model_scaling_decisions ORDER BY decision_id"""


class _Sampler:
    """Every second: the model's instance counts, and every live engine's queue-time histogram."""

    def __init__(self, stack: Stack, t0: float) -> None:
        self.stack, self.t0 = stack, t0
        self.samples: list[Sample] = []
        self.queue = HistogramSum()

    async def scrape(self, http: httpx.AsyncClient) -> None:
        for ep in await rows(self.stack.dsn, _LIVE):
            try:
                r = await http.get(
                    f"http://{ep['node']}:{ep['port']}/metrics",
                    headers={"authorization": f"Bearer {ep['bearer_token']}"},
                )
            except httpx.HTTPError:
                continue  # starting or gone: its last page was counted
            found = _histogram(r.text, QUEUE_METRIC) if r.status_code == 200 else None
            if found is not None:
                self.queue.observe(str(ep["endpoint_id"]), *found)

    async def sample(self, http: httpx.AsyncClient) -> Sample:
        before_sum, before_count = self.queue.sum, self.queue.count
        await self.scrape(http)
        [state] = await rows(self.stack.dsn, _STATE, MODEL)
        dc = self.queue.count - before_count
        s = Sample(
            t=time.time() - self.t0,
            desired=state["desired"],
            ready=state["ready"],
            pending=state["pending"],
            draining=state["draining"],
            queue_mean_s=(self.queue.sum - before_sum) / dc if dc > 0 else None,
        )
        self.samples.append(s)
        return s


async def _drive(
    stack: Stack, offsets: list[float], t0: float, args: argparse.Namespace, records: list[RequestRecord]
) -> None:
    """Send one streaming request at each offset (open loop); return when all have ended."""
    from bench.client import StreamClient
    from bench.stats import RequestRecord

    client = StreamClient("127.0.0.1", stack.gateway_port, api_key=stack.key)
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "stream": True,
            "max_tokens": args.tokens,
            "ignore_eos": True,
        }
    ).encode()
    tasks = []
    timeout = args.hold_s + 120.0
    try:
        for i, offset in enumerate(offsets):
            delay = t0 + offset - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = RequestRecord(index=i, prompt_len=1, max_tokens=args.tokens, start=offset)
            records.append(rec)
            tasks.append(
                asyncio.ensure_future(
                    client.post_stream("/v1/chat/completions", body, rec, chat=True, timeout=timeout)
                )
            )
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        client.close()


def _hhmm(t: float, day_s: float) -> str:
    minutes = int(24 * 60 * t / day_s)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


async def run_config(config: str, args: argparse.Namespace, offsets: list[float]) -> dict[str, Any]:
    day_s = args.day_minutes * 60.0
    speed = DAY_S / day_s
    n = args.max_instances
    limits = (
        {"min_instances": n, "max_instances": n, "desired_instances": n}
        if config == "static"
        else {"min_instances": 0, "max_instances": n, "desired_instances": 1}
    )
    env = {
        "HPCGATE_AUTOSCALER_INTERVAL_S": str(args.interval_s),
        "HPCGATE_AUTOSCALER_QUEUE_TIME_WINDOW_S": str(args.window_s),
    }
    async with scaling_stack(
        admin_dsn=args.admin_dsn, redis_url=args.redis_url, launcher=args.launcher, label="day", env=env
    ) as stack:
        await stack.admin(
            "POST",
            "/admin/models",
            {
                "name": MODEL,
                **limits,
                "slurm_resources": {"sim_profile": "paced", "sim_max_num_seqs": args.max_num_seqs},
            },
        )
        await stack.admin(
            "PATCH",
            f"/admin/models/{MODEL}/scaling",
            {
                "scale_up_queue_time_s": args.threshold_s,
                "scale_up_sustain_s": args.sustain_s,
                "scale_down_stabilise_s": args.stabilise_s,
                "scale_down_running_per_instance": args.scale_down_running,
                "cooldown_s": args.cooldown_s,
                "hold_s": args.hold_s,
            },
        )
        if config == "scheduled":
            await stack.admin("PUT", f"/admin/models/{MODEL}/schedule", {"schedule": args.schedule})
        await stack.wait_ready(MODEL, limits["desired_instances"], 120.0)
        t0 = time.time() + 3.0  # the day begins once the autoscaler runs
        await stack.start_autoscaler(
            {
                "HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_START": day_start(args).isoformat(),
                "HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_ORIGIN": datetime.fromtimestamp(t0, UTC).isoformat(),
                "HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_SPEED": repr(speed),
            }
        )
        await asyncio.sleep(max(0.0, t0 - time.time()))
        print(
            f"[{config}] day begins: 24 h in {args.day_minutes:g} min ({len(offsets)} requests)",
            file=sys.stderr,
        )
        records: list[RequestRecord] = []
        sampler = _Sampler(stack, t0)
        driver = asyncio.ensure_future(_drive(stack, offsets, t0, args, records))
        next_report = 0.0
        async with httpx.AsyncClient(timeout=2) as http:
            while not driver.done() or time.time() - t0 < day_s:
                s = await sampler.sample(http)
                if s.t >= next_report:
                    ended = sum(1 for r in records if r.success or r.error)
                    errors = sum(1 for r in records if r.error)
                    load = rate_at(24 * s.t / day_s, args.peak_rps)
                    print(
                        f"[{config}] {_hhmm(s.t, day_s)}  load {load:5.1f} req/s"
                        f"  desired {s.desired} ready {s.ready} pending {s.pending} draining {s.draining}"
                        f"  requests {ended}/{len(offsets)} failed {errors}",
                        file=sys.stderr,
                    )
                    next_report += day_s / 24
                await asyncio.sleep(max(0.0, 1.0 - (time.time() - t0 - s.t)))
            await driver
            t1 = t0 + day_s
            await sampler.scrape(http)
        spans = [JobSpan(r["started"], r["ended"]) for r in await rows(stack.dsn, _SPANS)]
        decisions = [dict(r) for r in await rows(stack.dsn, _DECISIONS) if r["at"] >= t0]
    failed = [r for r in records if not r.success]
    ttfts = [r.ttft for r in records if r.success]
    result = ConfigResult(
        config=config,
        description=_describe(config, args),
        requests=len(records),
        failed=len(failed),
        gpu_hours=gpu_seconds(spans, t0, t1) * speed / 3600,
        queue_p95_s=sampler.queue.quantile(0.95),
        queue_mean_s=sampler.queue.mean(),
        ttft_p95_s=percentile(ttfts, 0.95),
        decisions=len(decisions),
        decisions_by_reason=dict(Counter(d["reason"] for d in decisions)),
    )
    return {
        "result": msgspec.to_builtins(result),
        "samples": msgspec.to_builtins(sampler.samples),
        "decisions": [{**d, "at": d["at"] - t0} for d in decisions],
        "ttft_by_request": [[round(r.start, 3), round(r.ttft, 4) if r.success else None] for r in records],
        "errors": dict(Counter(r.error.split(":")[0] for r in failed)),
    }


def _describe(config: str, args: argparse.Namespace) -> str:
    n = args.max_instances
    if config == "static":
        return f"min = max = {n} all day"
    text = f"min 0, max {n}, the autoscaler"
    return text + (f" and the schedule {args.schedule!r}" if config == "scheduled" else "")


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    day_s = doc["settings"]["day_minutes"] * 60.0
    hours = [h / 4 for h in range(24 * 4 + 1)]
    fig, (ax_load, ax_inst, ax_ttft) = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    offsets = doc["arrivals"]
    bins = [0] * 96
    for t in offsets:
        bins[min(95, int(96 * t / day_s))] += 1
    per_bin_s = day_s / 96
    ax_load.step(hours[:-1], [b / per_bin_s for b in bins], where="post", color="black", label="offered")
    ax_load.plot(
        hours, [rate_at(h, doc["settings"]["peak_rps"]) for h in hours], color="grey", ls=":", label="pattern"
    )
    ax_load.set_ylabel("requests / s")
    ax_load.set_title(f"A compressed day: 24 h in {doc['settings']['day_minutes']:g} min")
    ax_load.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    colours = {"static": "tab:grey", "autoscaled": "tab:blue", "scheduled": "tab:orange"}
    for name, run in doc["runs"].items():
        xs = [24 * s[0] / day_s for s in run["samples"]]
        ax_inst.step(
            xs, [s[2] for s in run["samples"]], where="post", color=colours[name], label=f"{name}: ready"
        )
        ax_inst.step(
            xs,
            [s[1] for s in run["samples"]],
            where="post",
            color=colours[name],
            ls="--",
            alpha=0.6,
            label=f"{name}: desired",
        )
        pts = [(24 * t / day_s, ttft) for t, ttft in run["ttft_by_request"] if ttft is not None]
        ax_ttft.scatter(
            [p[0] for p in pts], [p[1] for p in pts], s=2, color=colours[name], alpha=0.4, label=name
        )
    ax_inst.set_ylabel("instances")
    ax_inst.set_ylim(0, doc["settings"]["max_instances"] + 0.5)
    ax_inst.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax_ttft.set_ylabel("TTFT (s), each request")
    ax_ttft.set_yscale("log")
    ax_ttft.set_xlabel(f"hour of day ({doc['settings']['tz']})")
    ax_ttft.set_xticks(range(0, 25, 2))
    ax_ttft.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def measure(args: argparse.Namespace, configs: list[str]) -> dict[str, Any]:
    day_s = args.day_minutes * 60.0
    offsets = arrivals(args.peak_rps, day_s, args.seed)
    runs = {}
    for config in configs:
        runs[config] = await run_config(config, args, offsets)
    settings = {
        k: getattr(args, k)
        for k in (
            "day_minutes",
            "peak_rps",
            "max_instances",
            "max_num_seqs",
            "tokens",
            "schedule",
            "date",
            "tz",
            "threshold_s",
            "sustain_s",
            "window_s",
            "stabilise_s",
            "scale_down_running",
            "cooldown_s",
            "interval_s",
            "hold_s",
            "seed",
            "launcher",
        )
    }
    return {
        "benchmark": "compressed-day",
        "engine": "hpcgate sim (paced)",
        "settings": settings,
        "arrivals": [round(t, 3) for t in offsets],
        "runs": runs,
        "machine": os.uname().nodename,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cmd_day(args: argparse.Namespace, results_dir: str) -> int:
    try:
        configs = check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out_dir or Path(results_dir) / f"day-{time.strftime('%Y%m%dT%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    doc = asyncio.run(measure(args, configs))
    (out / "results.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")  # ~0.2 MB a day
    table = summary_table([msgspec.convert(run["result"], ConfigResult) for run in doc["runs"].values()])
    lines = [table, ""] + [f"- {name}: {run['result']['description']}" for name, run in doc["runs"].items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.no_plot:
        plot(doc, out / "day.png")
    print(f"results: {out}")
    return 0
