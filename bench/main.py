"""``hpcgate bench ...``: the load driver (run), Table 1 reproduction (table) and the simulator's
calibration to it (calibrate), proxy overhead (overhead), the install's footprint (footprint),
the gateway's memory per connection (connections), the batch machinery (batch), the autoscaler's
reaction time (autoscale), a compressed day of diurnal load against autoscaled and static
allocations (day), the stack under faults (chaos) and cache-aware against least-queue routing
(prefix).

Settings section ``bench`` (``HPCGATE_BENCH_*``): ``results_dir`` (default ``bench-results``)
and ``log_level``. Every result names its workload; a synthetic one is always labelled so.

The load subcommands need the ``bench`` extra (numpy, matplotlib, psutil; ``pip install
'hpcgate[bench]'``), which the base install leaves out; without it they stop with a one-line
message saying so (exit 2) before importing anything of it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import uvloop

from bench import autoscale, connections, day, footprint, prefix_bench
from bench import batch as batch_bench
from bench.chaos_plan import add_parser as chaos_parser
from hpcgate.logs import setup_logging
from hpcgate.settings import LogLevel, load_settings

# What each subcommand imports beyond the base install.
NEEDS: dict[str, tuple[str, ...]] = {
    "run": ("numpy",),
    "table": ("numpy", "matplotlib", "psutil"),
    "calibrate": ("numpy",),
    "overhead": ("numpy", "psutil"),
    "footprint": (),
    "autoscale": (),
    "day": ("numpy", "matplotlib"),
    "connections": ("psutil",),
    "batch": ("numpy", "psutil"),
    "chaos": ("psutil",),
    "prefix": ("openai", "psutil"),
}


class BenchSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    results_dir: str = "bench-results"
    log_level: LogLevel = "warning"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run one streaming benchmark against an OpenAI-compatible server")
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default="sim-model", help="model name to request (default sim-model)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions (default) or /v1/chat/completions")
    p.add_argument("--num-prompts", type=_positive_int, default=100, help="requests to send (default 100)")
    p.add_argument("--max-concurrency", type=_positive_int,
                   help="requests in flight at most (default: no cap)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean requests per second (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps; 1 is Poisson (default 1)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="generate every requested output token")
    p.add_argument("--dataset-path", help="BurstGPT CSV; without it a SYNTHETIC workload is used")
    p.add_argument("--api-key", help="bearer token to send (a gateway's API key)")
    p.add_argument("--backend", help="what serves the model, for the summary and results (default: asked "
                   "of the server's /version; the simulator names its profile)")
    p.add_argument("--result-file", help="JSON results path (default: <results_dir>/run-<time>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu", type=int, help="pin the driver to this CPU (os.sched_setaffinity)")


def _table_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("table", help="reproduce the paper's Table 1: direct vs gateway vs nginx")
    p.add_argument("--quick", action="store_true", help="scaled down: fast profile, small counts (< 1 min)")
    p.add_argument("--profiles", default="gpu-s,gpu-l", help="simulator profiles, comma-separated")
    p.add_argument("--concurrency", default="100,500,1000", help="concurrency levels, comma-separated")
    p.add_argument("--targets", default="direct,gateway,nginx",
                   help="what to measure, comma-separated: direct, gateway, gateway-loop (no C relay), "
                        "nginx, lb-gateway-xN (nginx over N gateway deployments)")
    p.add_argument("--dataset-path", help="BurstGPT CSV; without it a SYNTHETIC workload is used")
    p.add_argument("--out-dir", help="where to write table.md, table.csv, results.json and plots")
    p.add_argument("--gateway-workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")


def _calibrate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("calibrate", help="the gpu-s/gpu-l profiles against the paper's Table 1, offline")
    p.add_argument("--profiles", default="gpu-s,gpu-l", help="calibrated profiles, comma-separated")
    p.add_argument("--fit", action="store_true",
                   help="search the fitted parameters, print the errors and write bench/sim/calibrated.py")
    p.add_argument("--iters", type=_positive_int, default=60,
                   help="Nelder-Mead iterations per profile (default 60)")
    p.add_argument("--no-write", action="store_true", help="with --fit: print, do not write")
    p.add_argument("--compare", metavar="RESULTS", help="a `bench table` results.json: measured vs paper")


def _overhead_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("overhead", help="data-plane overhead: CPU per 1000 requests and added TTFT")
    p.add_argument("--concurrency", default="100,500,1000", help="concurrency levels, comma-separated")
    p.add_argument("--targets", default="direct,gateway,nginx",
                   help="what to measure, comma-separated: direct, gateway, gateway-loop (no C relay), "
                        "nginx, lb-gateway-xN (nginx over N gateway deployments)")
    p.add_argument("--requests-per-level", type=int, help="requests per concurrency level (default 3x level)")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per stream (ignore_eos)")
    p.add_argument("--gateway-workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument("--upstream-profile", choices=["paced", "fast"], default="paced",
                   help="simulator upstream: paced (20 ms steps, default) or fast (as fast as the CPU)")
    p.add_argument("--out-dir", help="where to write the results and plots")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="an unmeasured warm-up of LEVEL 1-token requests before each level (default on)")
    p.add_argument("--quick", action="store_true", help="small counts, for tests")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcgate bench", description="benchmarks of hpcgate")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _table_parser(sub)
    _calibrate_parser(sub)
    _overhead_parser(sub)
    footprint.add_parser(sub)
    autoscale.add_parser(sub)
    day.add_parser(sub)
    connections.add_parser(sub)
    batch_bench.add_parser(sub)
    chaos_parser(sub)
    prefix_bench.add_parser(sub)
    return parser


def _cmd_run(args: argparse.Namespace, settings: BenchSettings) -> int:
    from bench.driver import RunSettings, describe_backend, format_report, run_benchmark
    from bench.workload import load_burstgpt, synthetic

    url = urlsplit(args.base_url)
    if url.scheme != "http" or not url.hostname:
        print(f"hpcgate bench run: error: --base-url must be http://HOST[:PORT], got {args.base_url!r}",
              file=sys.stderr)
        return 2
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (OSError, ValueError) as exc:
            print(f"hpcgate bench run: error: --cpu {args.cpu}: {exc}", file=sys.stderr)
            return 2
    if args.dataset_path:
        try:
            workload = load_burstgpt(args.dataset_path, args.num_prompts, args.seed)
        except (OSError, ValueError) as exc:
            print(f"hpcgate bench run: error: --dataset-path: {exc}", file=sys.stderr)
            return 2
    else:
        workload = synthetic(args.num_prompts, args.seed)
        print("note: no --dataset-path given; using a SYNTHETIC workload (not BurstGPT)", file=sys.stderr)
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    run = RunSettings(base_url=base_url, model=args.model,
                      backend=args.backend or describe_backend(base_url, args.api_key),
                      endpoint=args.endpoint, num_prompts=args.num_prompts,
                      max_concurrency=args.max_concurrency,
                      request_rate=args.request_rate, burstiness=args.burstiness, seed=args.seed,
                      ignore_eos=args.ignore_eos, api_key=args.api_key)
    try:
        doc = uvloop.run(run_benchmark(run, workload, progress=False if args.no_progress else None))
    except RuntimeError as exc:  # the warm-up request failed: nothing was measured
        print(f"hpcgate bench run: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(doc))
    path = Path(args.result_file or Path(settings.results_dir) / f"run-{time.strftime('%Y%m%dT%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {path}")
    return 0 if doc["metrics"]["completed"] else 1  # type: ignore[index]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    missing = [name for name in NEEDS[args.command] if importlib.util.find_spec(name) is None]
    if missing:
        print(f"hpcgate bench {args.command}: error: {', '.join(missing)} not installed; "
              "install hpcgate[bench] (pip install 'hpcgate[bench]')", file=sys.stderr)
        return 2
    settings = load_settings(BenchSettings, "bench")
    setup_logging(settings.log_level)
    if args.command == "run":
        return _cmd_run(args, settings)
    if args.command == "footprint":
        return footprint.cmd_footprint(args)
    if args.command == "autoscale":
        return autoscale.cmd_autoscale(args, settings.results_dir)
    if args.command == "day":
        return day.cmd_day(args, settings.results_dir)
    if args.command == "prefix":
        return prefix_bench.cmd_prefix(args, settings.results_dir)
    if args.command == "connections":
        return connections.cmd_connections(args, settings.results_dir)
    if args.command == "calibrate":
        from bench.calibrate import cmd_calibrate

        return cmd_calibrate(args)
    if args.command == "chaos":
        from bench.chaos import cmd_chaos

        return cmd_chaos(args, settings.results_dir)
    if args.command == "table":
        from bench.table import cmd_table

        return cmd_table(args, settings.results_dir)
    if args.command == "batch":
        from bench.batch import cmd_batch

        return cmd_batch(args, settings.results_dir)
    from bench.overhead import cmd_overhead

    return cmd_overhead(args, settings.results_dir)
