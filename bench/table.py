"""``hpcgate bench table``: the paper's Table 1 (Trappen et al.), reproduced on the simulator.

For each profile x concurrency x target (direct to the simulator, via the hpcgate gateway,
via nginx) a fresh simulator (and proxy) is started and ``N`` streaming requests are sent at
max concurrency ``N`` (the paper's "N concurrent requests"). Outputs, under ``--out-dir``:
``table.md`` (Table 1 layout, ours beside the paper's), ``table.csv`` (long format),
``results.json`` (every cell's metrics), ``cells/*.json`` (raw per-request records) and
``ttft.png``/``tpot.png``/``e2el.png``. Overheads are reported as differences and as ratios
against direct, measured in the same run; a target that cannot start is reported as such
("gateway did not start: ...") and the other columns are still filled.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import uvloop

from bench import procs
from bench.driver import RunSettings, git_commit, machine, run_benchmark
from bench.paper import PAPER, PAPER_SOURCE, paper_value
from bench.workload import Workload, load_burstgpt, synthetic

if TYPE_CHECKING:  # matplotlib is imported only when plotting (the bench extra)
    from matplotlib.figure import Figure

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
TARGET_TITLES = {"direct": "vLLM Node (direct)", "gateway": "hpcgate gateway", "nginx": "nginx"}
# One colour per target in every plot (the paper's published values in black).
PALETTE = {"direct": "tab:blue", "gateway": "tab:orange", "nginx": "tab:green", "paper": "black"}
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


async def run_cell(profile: str, concurrency: int, target: str, workload: Workload, *,
                   ignore_eos: bool, seed: int, gateway_workers: int, cells_dir: Path) -> Cell:
    cell = Cell(profile=profile, concurrency=concurrency, target=target)
    sim = await procs.start_sim(profile, MODEL)
    proxy: procs.Child | None = None
    try:
        proxy = await procs.start_proxy(target, MODEL, sim, gateway_workers)
        base = proxy.url if proxy else sim.url
        settings = RunSettings(base_url=base, model=MODEL, num_prompts=concurrency,
                               max_concurrency=concurrency, ignore_eos=ignore_eos, seed=seed,
                               label=f"{profile} c={concurrency} {target}")
        cpu0 = proxy.cpu_seconds() if proxy else 0.0
        doc = await run_benchmark(settings, workload)
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
    return cell


async def run_table(profiles: list[str], levels: list[int], targets: list[str],
                    workload_for: Callable[[int], Workload], *, ignore_eos: bool, seed: int,
                    gateway_workers: int, out_dir: Path) -> list[Cell]:
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    for profile in profiles:
        for level in levels:
            workload = workload_for(level)
            for target in targets:
                cell = await run_cell(profile, level, target, workload, ignore_eos=ignore_eos, seed=seed,
                                      gateway_workers=gateway_workers, cells_dir=cells_dir)
                status = (f"median TTFT {cell.metrics['median_ttft_ms']:.1f} ms" if cell.metrics
                          else cell.error)
                print(f"[table] {profile} c={level} {target}: {status}", flush=True)
                cells.append(cell)
    return cells


# --- rendering --------------------------------------------------------------------------------
def _fmt(fmt: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def render_markdown(cells: list[Cell], workload_label: str, header: dict[str, object]) -> str:
    by = {(c.profile, c.concurrency, c.target): c for c in cells}
    profiles = list(dict.fromkeys(c.profile for c in cells))
    levels = list(dict.fromkeys(c.concurrency for c in cells))
    targets = list(dict.fromkeys(c.target for c in cells))
    out = [f"Workload: **{workload_label}**. Commit `{header['git_commit']}`, {header['date']}, "
           f"machine {header['machine']}.", "",
           f"Paper values: {PAPER_SOURCE}", ""]
    for profile in profiles:
        out += [f"### {profile}", ""]
        cols = []
        for level in levels:  # a paper column only where the paper has a value: never all n/a
            has_paper = any(paper_value(profile, level, key) is not None for key, _, _ in ROWS)
            cols += [(level, t) for t in targets] + ([(level, "paper")] if has_paper else [])
        out.append("| metric | " + " | ".join(
            f"{lv} {TARGET_TITLES.get(t, 'paper vLLM Node')}" for lv, t in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for key, title, fmt in ROWS:
            row = []
            for level, target in cols:
                if target == "paper":
                    row.append(_fmt(fmt, paper_value(profile, level, key)))
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


def render_overheads(cells: list[Cell], profile: str, levels: list[int]) -> list[str]:
    by = {(c.profile, c.concurrency, c.target): c for c in cells}
    lines = [f"Overheads vs direct ({profile}; difference in ms, ratio via/direct):", "",
             "| concurrency | via | Δ median TTFT | TTFT ratio | Δ median TPOT | Δ median E2EL | E2EL ratio "
             "| req/s ratio | proxy CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        direct = by.get((profile, level, "direct"))
        for via in ("gateway", "nginx"):
            cell = by.get((profile, level, via))
            if cell is None:
                continue
            if not (direct and direct.metrics and cell.metrics):
                lines.append(f"| {level} | {via} | {cell.error or 'n/a'} |  |  |  |  |  |  |")
                continue
            d, v = direct.metrics, cell.metrics

            def ratio(k: str, d: dict[str, float] = d, v: dict[str, float] = v) -> str:
                return f"{v[k] / d[k]:.3f}" if d.get(k) else "n/a"

            cpu = f"{cell.proxy_cpu_s:.2f}" if cell.proxy_cpu_s is not None else "n/a"
            dttft = v["median_ttft_ms"] - d["median_ttft_ms"]
            dtpot = v["median_tpot_ms"] - d["median_tpot_ms"]
            de2el = v["median_e2el_ms"] - d["median_e2el_ms"]
            lines.append(
                f"| {level} | {via} | {dttft:+.2f} | {ratio('median_ttft_ms')} | {dtpot:+.2f} | {de2el:+.2f} "
                f"| {ratio('median_e2el_ms')} | {ratio('request_throughput')} | {cpu} |")
    return lines


def write_csv(cells: list[Cell], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["profile", "concurrency", "target", "metric", "value", "paper_vllm_node", "error"])
        for c in cells:
            if not c.metrics:
                w.writerow([c.profile, c.concurrency, c.target, "", "", "", c.error])
                continue
            for key, _, _ in ROWS:
                paper = paper_value(c.profile, c.concurrency, key) if c.target == "direct" else None
                w.writerow([c.profile, c.concurrency, c.target, key, c.metrics.get(key), paper, ""])


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
            paper = sorted((lv, v) for lv in PAPER.get(profile, {})
                           if (v := paper_value(profile, lv, key)) is not None)
            if paper:
                ax.plot([p[0] for p in paper], [p[1] for p in paper], "--", marker="x",
                        color=PALETTE["paper"], label="paper vLLM Node")
            ax.set_title(f"{profile}: {title}")
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel(title)
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        out[key.removeprefix("median_").removesuffix("_ms") + ".png"] = fig
    # What the proxies add: via minus direct, per profile, for TTFT and E2EL medians.
    by = {(c.profile, c.concurrency, c.target): c.metrics for c in cells if c.metrics}
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        for via in ("gateway", "nginx"):
            for key, style in (("median_ttft_ms", "-"), ("median_e2el_ms", ":")):
                pts = sorted((lv, m[key] - d[key]) for (p, lv, t), m in by.items()
                             if p == profile and t == via and (d := by.get((p, lv, "direct"))))
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=PALETTE[via],
                            label=f"{via}: {key.removeprefix('median_').removesuffix('_ms').upper()}")
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

        def workload_for(n: int) -> Workload:
            return load_burstgpt(args.dataset_path, n, args.seed)
        ignore_eos = False
    else:
        label = ("SYNTHETIC (not BurstGPT): long-tailed lengths matched to the paper's token totals, "
                 "ignore_eos so outputs are exactly those lengths")

        def workload_for(n: int) -> Workload:
            return synthetic(n, args.seed)
        ignore_eos = True
    header: dict[str, object] = {
              "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{machine()['cpu_count']} CPUs, {machine()['platform']}"}
    cells = uvloop.run(run_table(profiles, levels, targets, workload_for, ignore_eos=ignore_eos,
                                 seed=args.seed, gateway_workers=args.gateway_workers, out_dir=out_dir))
    md = render_markdown(cells, label, header)
    (out_dir / "table.md").write_text(md + "\n")
    write_csv(cells, out_dir / "table.csv")
    (out_dir / "results.json").write_text(json.dumps(
        {"workload": label, **header, "cells": msgspec.to_builtins(cells)}, indent=1))
    plots = plot(cells, out_dir)
    print(md)
    print(f"\nwritten: {out_dir}/table.md table.csv results.json {' '.join(plots)}")
    direct_ok = all(c.metrics and not c.metrics.get("failed") for c in cells if c.target == "direct")
    return 0 if direct_ok else 1
