"""``hpcgate bench table``: the paper's Table 1 (Trappen et al.), reproduced on the simulator.

For each profile x concurrency x target (direct to the simulator, via the hpcgate gateway,
via nginx) a fresh simulator (and proxy) is started and ``N`` streaming requests are sent at
max concurrency ``N`` (the paper's "N concurrent requests"). Outputs, under ``--out-dir``:
``table.md`` (Table 1 layout, ours beside the paper's), ``table.csv`` (long format),
``results.json`` (every cell's metrics), ``cells/*.json`` (raw per-request records) and
``ttft.png``/``tpot.png``/``e2el.png``/``overhead.png``. Beside ours, each cell shows the
paper's own two columns ("vLLM Node" = paper direct, "Web Gateway" = paper gateway, from
``bench.paper``) where it has them. What a proxy adds is reported as differences against
direct, ours measured in the same run and the paper's gateway against the paper's direct, side
by side; a target that cannot start is reported as such ("gateway did not start: ...") and the
other columns are still filled. A run shows one progress bar per cell and the ETA of the whole
table (from the offline prediction of each cell, ``bench.calibrate.predict``, corrected by the
cells measured so far); ``results.json`` names every profile's parameters.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import uvloop

from bench import procs
from bench.calibrate import predict
from bench.driver import RunSettings, git_commit, machine, run_benchmark
from bench.paper import PAPER_SOURCE, Column, paper_levels, paper_value
from bench.sim.profiles import PROFILES
from bench.workload import Workload, load_burstgpt, synthetic

if TYPE_CHECKING:  # matplotlib is imported only when plotting (the bench extra)
    from matplotlib.figure import Figure

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
TARGET_TITLES = {"direct": "vLLM Node (direct)", "gateway": "hpcgate gateway", "nginx": "nginx"}
# The paper's columns, by the name bench.paper gives them.
PAPER_TITLES: dict[Column, str] = {"direct": "paper vLLM Node", "gateway": "paper Web Gateway"}
# One colour per target in every plot (the paper's published values in black and grey).
PALETTE = {"direct": "tab:blue", "gateway": "tab:orange", "nginx": "tab:green", "paper": "black",
           "paper-gateway": "tab:gray"}
ROWS: tuple[tuple[str, str, str], ...] = (
    # (metric key, title, format)
    ("completed", "Successful requests", "{:.0f}"),
    ("failed", "Failed requests", "{:.0f}"),
    ("duration", "Benchmark duration (s)", "{:.2f}"),
    ("total_input_tokens", "Total input tokens", "{:.0f}"),
    ("total_output_tokens", "Total generated tokens", "{:.0f}"),
    ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
    ("output_throughput", "Output token throughput (tok/s)", "{:.2f}"),
    ("total_token_throughput", "Total token throughput (tok/s)", "{:.2f}"),
    ("median_ttft_ms", "Median TTFT (ms)", "{:.2f}"),
    ("median_tpot_ms", "Median TPOT (ms)", "{:.2f}"),
    ("median_e2el_ms", "Median E2EL (ms)", "{:.2f}"),
    ("std_e2el_ms", "Std E2EL (ms)", "{:.2f}"),
    ("p99_ttft_ms", "P99 TTFT (ms)", "{:.2f}"),
)


class Cell(msgspec.Struct, kw_only=True):
    profile: str
    concurrency: int
    target: str
    metrics: dict[str, float] | None = None
    error: str = ""
    driver_cpu_s: float = 0.0
    proxy_cpu_s: float | None = None
    wall_s: float = 0.0  # the whole cell: processes started, run, stopped


async def run_cell(profile: str, concurrency: int, target: str, workload: Workload, *,
                   ignore_eos: bool, seed: int, gateway_workers: int, cells_dir: Path, label: str = "",
                   progress: bool | None = None) -> Cell:
    cell = Cell(profile=profile, concurrency=concurrency, target=target)
    t0 = time.monotonic()
    sim = await procs.start_sim(profile, MODEL)
    proxy: procs.Child | None = None
    try:
        proxy = await procs.start_proxy(target, MODEL, sim, gateway_workers)
        base = proxy.url if proxy else sim.url
        settings = RunSettings(base_url=base, model=MODEL, num_prompts=concurrency,
                               max_concurrency=concurrency, ignore_eos=ignore_eos, seed=seed,
                               label=label or f"{profile} c={concurrency} {target}")
        cpu0 = proxy.cpu_seconds() if proxy else 0.0
        doc = await run_benchmark(settings, workload, progress)
        if proxy:
            cell.proxy_cpu_s = proxy.cpu_seconds() - cpu0
        metrics = doc["metrics"]
        assert isinstance(metrics, dict)
        cell.metrics = {k: float(v) for k, v in metrics.items()}
        cell.driver_cpu_s = float(doc["driver_cpu_s"])  # type: ignore[arg-type]
        (cells_dir / f"{profile}-{concurrency}-{target}.json").write_text(json.dumps(doc, default=str))
    except procs.TargetUnavailableError as exc:
        cell.error = str(exc)
    except (RuntimeError, OSError) as exc:
        cell.error = f"{target} run failed: {exc}"
    finally:
        if proxy is not None:
            await procs.stop(proxy)
        await procs.stop(sim)
        cell.wall_s = time.monotonic() - t0
    return cell


class Eta:
    """Seconds left of a table run: each cell's expected wall time is its predicted duration
    (the engine offline, for a calibrated profile; else the last measured cell of that profile
    and level) plus the start/stop cost, both corrected by what the measured cells took."""

    def __init__(self, plan: list[tuple[str, int, str]],
                 workload_for: Callable[[str, int], Workload]) -> None:
        self.predicted: dict[tuple[str, int], float] = {}
        for profile, level, _ in plan:
            if (profile, level) not in self.predicted and paper_levels(profile):
                self.predicted[profile, level] = predict(PROFILES[profile], workload_for(profile, level),
                                                         level)["duration"]
        self.left = list(plan)
        self.scale, self.overhead_s = 1.0, 3.0
        self._pairs: list[tuple[float, float]] = []  # (predicted, measured duration)
        self._measured: dict[tuple[str, int], float] = {}

    def done(self, cell: Cell) -> None:
        self.left.remove((cell.profile, cell.concurrency, cell.target))
        if not cell.metrics:
            return
        duration = cell.metrics["duration"]
        self._measured[cell.profile, cell.concurrency] = duration
        self.overhead_s = max(0.0, cell.wall_s - duration)
        if (pred := self.predicted.get((cell.profile, cell.concurrency))) is not None:
            self._pairs.append((pred, duration))
            self.scale = sum(m for _, m in self._pairs) / sum(p for p, _ in self._pairs)

    def seconds(self) -> float:
        total = 0.0
        for profile, level, _ in self.left:
            pred = self.predicted.get((profile, level))
            run = pred * self.scale if pred is not None else self._measured.get((profile, level), 10.0)
            total += run + self.overhead_s
        return total


def _fmt_eta(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


async def run_table(profiles: list[str], levels: list[int], targets: list[str],
                    workload_for: Callable[[str, int], Workload], *, ignore_eos: bool, seed: int,
                    gateway_workers: int, out_dir: Path, progress: bool | None = None) -> list[Cell]:
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    plan = [(p, lv, t) for p in profiles for lv in levels for t in targets]
    eta = Eta(plan, workload_for)
    print(f"[table] {len(plan)} cells, ETA {_fmt_eta(eta.seconds())}", flush=True)
    cells = []
    for k, (profile, level, target) in enumerate(plan, start=1):
        label = f"[{k}/{len(plan)} ETA {_fmt_eta(eta.seconds())}] {profile} c={level} {target}"
        cell = await run_cell(profile, level, target, workload_for(profile, level), ignore_eos=ignore_eos,
                              seed=seed, gateway_workers=gateway_workers, cells_dir=cells_dir, label=label,
                              progress=progress)
        eta.done(cell)
        status = (f"median TTFT {cell.metrics['median_ttft_ms']:.1f} ms" if cell.metrics else cell.error)
        print(f"[table {k}/{len(plan)}] {profile} c={level} {target}: {status} ({cell.wall_s:.0f} s; "
              f"ETA {_fmt_eta(eta.seconds())})", flush=True)
        cells.append(cell)
    return cells


# --- rendering --------------------------------------------------------------------------------
def _fmt(fmt: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def _paper_columns(profile: str, level: int) -> list[Column]:
    """The paper's columns that have a value for this profile and level: never an all-n/a column."""
    return [col for col in PAPER_TITLES
            if any(paper_value(profile, level, key, col) is not None for key, _, _ in ROWS)]


def render_markdown(cells: list[Cell], workload_label: str, header: dict[str, object]) -> str:
    by = {(c.profile, c.concurrency, c.target): c for c in cells}
    profiles = list(dict.fromkeys(c.profile for c in cells))
    levels = list(dict.fromkeys(c.concurrency for c in cells))
    targets = list(dict.fromkeys(c.target for c in cells))
    out = [f"Workload: **{workload_label}**. Commit `{header['git_commit']}`, {header['date']}, "
           f"machine {header['machine']}.", "",
           f"Paper values: {PAPER_SOURCE}.", ""]
    for profile in profiles:
        out += [f"### {profile}", ""]
        cols: list[tuple[int, str]] = []
        for level in levels:
            cols += [(level, t) for t in targets]
            cols += [(level, f"paper:{c}") for c in _paper_columns(profile, level)]
        out.append("| metric | " + " | ".join(
            f"{lv} {PAPER_TITLES[t[6:]] if t.startswith('paper:') else TARGET_TITLES[t]}"  # type: ignore[index]
            for lv, t in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for key, title, fmt in ROWS:
            row = []
            for level, target in cols:
                if target.startswith("paper:"):
                    row.append(_fmt(fmt, paper_value(profile, level, key, target[6:])))  # type: ignore[arg-type]
                    continue
                cell = by.get((profile, level, target))
                row.append(_fmt(fmt, cell.metrics.get(key)) if cell and cell.metrics else "—")
            out.append(f"| {title} | " + " | ".join(row) + " |")
        errors = [c for c in cells if c.profile == profile and c.error]
        out.append("")
        for c in errors:
            out.append(f"- c={c.concurrency} {c.target}: **{c.error}**")
        out += ["", *render_overheads(cells, profile, levels), ""]
    return "\n".join(out)


OVERHEAD_KEYS = (("median_ttft_ms", "TTFT"), ("median_e2el_ms", "E2EL"), ("median_tpot_ms", "TPOT"))


def added(via: dict[str, float], direct: dict[str, float], key: str) -> tuple[float, float | None]:
    """What ``via`` adds over ``direct`` for a metric: (difference, relative or None)."""
    diff = via[key] - direct[key]
    return diff, (diff / direct[key] if direct[key] else None)


def _fmt_added(diff: float, rel: float | None) -> str:
    return f"{diff:+.1f} ({100 * rel:+.0f} %)" if rel is not None else f"{diff:+.1f}"


def render_overheads(cells: list[Cell], profile: str, levels: list[int]) -> list[str]:
    """Added over direct: our gateway and nginx (same run) beside the paper's gateway (vs its direct)."""
    by = {(c.profile, c.concurrency, c.target): c for c in cells}
    lines = [f"Added over direct ({profile}; median, ms and %; ours against our direct in the same run, "
             "the paper's gateway against the paper's direct):", "",
             "| concurrency | via | " + " | ".join(f"Δ {name}" for _, name in OVERHEAD_KEYS)
             + " | req/s ratio | proxy CPU s |",
             "|---|---|" + "---|" * (len(OVERHEAD_KEYS) + 2)]
    blank = " |" * (len(OVERHEAD_KEYS) + 1)
    for level in levels:
        direct = by.get((profile, level, "direct"))
        for via in ("gateway", "nginx"):
            cell = by.get((profile, level, via))
            if cell is None:
                continue
            if not (direct and direct.metrics and cell.metrics):
                lines.append(f"| {level} | {TARGET_TITLES[via]} | {cell.error or 'n/a'} |{blank}")
                continue
            d, v = direct.metrics, cell.metrics
            cpu = f"{cell.proxy_cpu_s:.2f}" if cell.proxy_cpu_s is not None else "n/a"
            ratio = (f"{v['request_throughput'] / d['request_throughput']:.3f}" if d.get("request_throughput")
                     else "n/a")
            lines.append(f"| {level} | {TARGET_TITLES[via]} | "
                         + " | ".join(_fmt_added(*added(v, d, k)) for k, _ in OVERHEAD_KEYS)
                         + f" | {ratio} | {cpu} |")
        pd = paper_metrics(profile, level, "direct")
        pg = paper_metrics(profile, level, "gateway")
        if pd and pg:
            lines.append(f"| {level} | {PAPER_TITLES['gateway']} | "
                         + " | ".join(_fmt_added(*added(pg, pd, k)) for k, _ in OVERHEAD_KEYS)
                         + f" | {pg['request_throughput'] / pd['request_throughput']:.3f} | n/a |")
    return lines


def paper_metrics(profile: str, level: int, column: Column) -> dict[str, float] | None:
    values = {key: paper_value(profile, level, key, column) for key, _ in OVERHEAD_KEYS}
    values["request_throughput"] = paper_value(profile, level, "request_throughput", column)
    return {k: v for k, v in values.items() if v is not None} if all(
        v is not None for v in values.values()) else None


def write_csv(cells: list[Cell], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["profile", "concurrency", "target", "metric", "value", "paper_vllm_node",
                    "paper_web_gateway", "error"])
        for c in cells:
            if not c.metrics:
                w.writerow([c.profile, c.concurrency, c.target, "", "", "", "", c.error])
                continue
            for key, _, _ in ROWS:
                w.writerow([c.profile, c.concurrency, c.target, key, c.metrics.get(key),
                            paper_value(c.profile, c.concurrency, key, "direct"),
                            paper_value(c.profile, c.concurrency, key, "gateway"), ""])


def plot(cells: list[Cell], out_dir: Path) -> list[str]:
    import matplotlib.pyplot as plt

    written = []
    for name, fig in figures(cells).items():
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def figures(cells: list[Cell]) -> dict[str, Figure]:
    """The plots by file name. Absolute values start at zero on both axes, so small differences
    look small; the overhead plot shows differences and always includes its zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Figure] = {}
    profiles = list(dict.fromkeys(c.profile for c in cells))
    for key, title in (("median_ttft_ms", "Median TTFT (ms)"), ("median_tpot_ms", "Median TPOT (ms)"),
                       ("median_e2el_ms", "Median E2EL (ms)")):
        fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
        for ax, profile in zip(axes[0], profiles, strict=True):
            for target in dict.fromkeys(c.target for c in cells):
                pts = sorted((c.concurrency, c.metrics[key]) for c in cells
                             if c.profile == profile and c.target == target and c.metrics)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=TARGET_TITLES[target],
                            color=PALETTE[target])
            paper_styles: tuple[tuple[Column, str], ...] = (("direct", "--"), ("gateway", ":"))
            for col, style in paper_styles:
                paper = [(lv, v) for lv in paper_levels(profile)
                         if (v := paper_value(profile, lv, key, col)) is not None]
                if paper:
                    ax.plot([p[0] for p in paper], [p[1] for p in paper], style, marker="x",
                            color=PALETTE["paper" if col == "direct" else "paper-gateway"],
                            label=PAPER_TITLES[col])
            ax.set_title(f"{profile}: {title}")
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel(title)
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        out[key.removeprefix("median_").removesuffix("_ms") + ".png"] = fig
    # What the proxies add: via minus direct, per profile, for TTFT and E2EL medians; the paper's
    # gateway minus the paper's direct beside ours.
    by = {(c.profile, c.concurrency, c.target): c.metrics for c in cells if c.metrics}
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        for key, style in (("median_ttft_ms", "-"), ("median_e2el_ms", ":")):
            name = key.removeprefix("median_").removesuffix("_ms").upper()
            for via in ("gateway", "nginx"):
                pts = sorted((lv, m[key] - d[key]) for (p, lv, t), m in by.items()
                             if p == profile and t == via and (d := by.get((p, lv, "direct"))))
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=PALETTE[via],
                            label=f"{via}: {name}")
            paper = [(lv, pg[key] - pd[key]) for lv in paper_levels(profile)
                     if (pd := paper_metrics(profile, lv, "direct"))
                     and (pg := paper_metrics(profile, lv, "gateway"))]
            if paper and any(c.profile == profile and c.target != "direct" for c in cells):
                ax.plot([x for x, _ in paper], [y for _, y in paper], style, marker="x",
                        color=PALETTE["paper-gateway"], label=f"paper-gateway: {name}")
        ax.axhline(0, color="grey", linewidth=0.8)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, 0.0), max(high, 0.0))
        ax.set_xlim(left=0)
        ax.set_title(f"{profile}: added over direct (ms)")
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out["overhead.png"] = fig
    return out


def cmd_table(args: argparse.Namespace, results_dir: str) -> int:
    if args.quick:
        profiles, levels = ["fast"], [8, 32]
    else:
        profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGET_TITLES]
    if unknown:
        raise SystemExit(f"hpcgate bench table: unknown target(s) {unknown}; "
                         f"choose from {list(TARGET_TITLES)}")
    out_dir = Path(args.out_dir or Path(results_dir) / f"table-{time.strftime('%Y%m%dT%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset_path:
        label = f"BurstGPT ({args.dataset_path}, GPT-4 rows, seed {args.seed})"

        def workload_for(profile: str, n: int) -> Workload:
            return load_burstgpt(args.dataset_path, n, args.seed)
        ignore_eos = False
    else:
        label = ("SYNTHETIC (not BurstGPT): long-tailed lengths matched to the paper's token totals per "
                 "profile, ignore_eos so outputs are exactly those lengths")

        def workload_for(profile: str, n: int) -> Workload:
            return synthetic(n, args.seed, profile)
        ignore_eos = True
    header: dict[str, object] = {
              "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{machine()['cpu_count']} CPUs, {machine()['platform']}"}
    # each (profile, level) is needed by the ETA, every target and the results: build it once
    workload_for = functools.cache(workload_for)
    cells = uvloop.run(run_table(profiles, levels, targets, workload_for, ignore_eos=ignore_eos,
                                 seed=args.seed, gateway_workers=args.gateway_workers, out_dir=out_dir))
    md = render_markdown(cells, label, header)
    (out_dir / "table.md").write_text(md + "\n")
    write_csv(cells, out_dir / "table.csv")
    (out_dir / "results.json").write_text(json.dumps(
        {"workload": label, **header,
         "workload_sources": {p: workload_for(p, max(levels)).source for p in profiles},
         "profiles": {p: msgspec.to_builtins(PROFILES[p]) for p in profiles},
         "cells": msgspec.to_builtins(cells)}, indent=1))
    plots = plot(cells, out_dir)
    print(md)
    print(f"\nwritten: {out_dir}/table.md table.csv results.json {' '.join(plots)}")
    direct_ok = all(c.metrics and not c.metrics.get("failed") for c in cells if c.target == "direct")
    return 0 if direct_ok else 1
