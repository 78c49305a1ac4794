"""End to end: ``hpcgate bench table --quick`` and a headless locust run against the simulator."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from pathlib import Path

from tests.support.procs import child_env, hpcgate_cmd
from tests.support.sim import sim_process

ROOT = Path(__file__).resolve().parents[2]
LOCUST = str(Path(sys.executable).with_name("locust"))


async def run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


async def test_quick_table_end_to_end(tmp_path: Path) -> None:
    # --quick is documented to take under a minute: the bound is the timeout
    code, out = await run(hpcgate_cmd("bench", "table", "--quick", "--out-dir", str(tmp_path)), timeout=60)
    assert code == 0, out
    assert "[table 6/6]" in out and "ETA" in out  # progress per cell with the ETA of the rest
    for name in ("table.md", "table.csv", "results.json", "ttft.png", "tpot.png", "e2el.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["workload"].startswith("SYNTHETIC")
    assert doc["profiles"]["fast"]["base_s"] == 0.001  # the profile's parameters are named
    cells = {(c["concurrency"], c["target"]): c for c in doc["cells"]}
    for level in (8, 32):
        for target in ("direct", "nginx"):
            m = cells[(level, target)]["metrics"]
            assert m is not None, cells[(level, target)]["error"]
            assert (m["completed"], m["failed"]) == (level, 0)
            assert m["median_ttft_ms"] > 0 and m["median_tpot_ms"] > 0
        # same workload through every target: identical token totals
        totals = {cells[(level, t)]["metrics"]["total_output_tokens"] for t in ("direct", "nginx")}
        assert len(totals) == 1
        gw = cells[(level, "gateway")]
        assert gw["metrics"] is not None, gw["error"]  # the gateway has landed: its column must work
        assert (gw["metrics"]["completed"], gw["metrics"]["failed"]) == (level, 0)
        direct = cells[(level, "direct")]["metrics"]
        assert gw["metrics"]["total_output_tokens"] == direct["total_output_tokens"]
        assert gw["proxy_cpu_s"] is not None and gw["proxy_cpu_s"] >= 0
    md = (tmp_path / "table.md").read_text()
    assert "SYNTHETIC" in md and "Median TTFT (ms)" in md and "Added over direct" in md
    rows = list(csv.DictReader((tmp_path / "table.csv").read_text().splitlines()))
    assert {r["target"] for r in rows} == {"direct", "gateway", "nginx"}


async def test_locust_records_ttft_without_failures(tmp_path: Path) -> None:
    async with sim_process() as sim:
        prefix = tmp_path / "locust"
        code, out = await run([LOCUST, "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "-u", "5",
                               "-r", "5", "-t", "4s", "--host", sim.url, "--max-tokens", "16",
                               "--csv", str(prefix), "--only-summary"], timeout=60)
    assert code == 0, out
    lines = Path(f"{prefix}_stats.csv").read_text().splitlines()  # noqa: ASYNC240 - small local file
    stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(lines)}
    chat, ttft = stats[("POST", "chat")], stats[("TTFT", "chat")]
    assert int(chat["Request Count"]) > 0 and int(chat["Failure Count"]) == 0
    assert int(ttft["Request Count"]) > 0 and int(ttft["Failure Count"]) == 0


async def test_bench_run_cli_with_burstgpt_csv_and_chat(tmp_path: Path) -> None:
    csv_path = tmp_path / "burst.csv"
    rows = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    rows += [f"{i},GPT-4,{50 + i},{5 + i},{55 + 2 * i},API log" for i in range(20)]
    rows += ["99,ChatGPT,10,10,20,API log"]
    csv_path.write_text("\n".join(rows) + "\n")
    result = tmp_path / "run.json"
    async with sim_process("--eos-mean-tokens", "8") as sim:
        cmd = hpcgate_cmd("bench", "run", "--base-url", sim.url, "--endpoint", "chat", "--num-prompts", "6",
                          "--max-concurrency", "3", "--dataset-path", str(csv_path), "--result-file",
                          str(result), "--no-progress")
        code, out = await run(cmd, timeout=60)
    assert code == 0, out
    doc = json.loads(result.read_text())
    assert doc["workload"] == "burstgpt" and doc["settings"]["endpoint"] == "chat"
    m = doc["metrics"]
    assert (m["completed"], m["failed"]) == (6, 0)
    reqs = doc["requests"]
    assert all(50 <= r["prompt_len"] < 70 for r in reqs)
    assert all(1 <= r["output_tokens"] <= r["max_tokens"] for r in reqs)  # EOS may stop early: no ignore_eos
    assert m["total_input_tokens"] == sum(r["prompt_len"] for r in reqs)
    assert doc["git_commit"] and doc["driver_cpu_s"] >= 0 and "Serving Benchmark Result" in out
    # the summary and the results name the simulator and its profile (asked of its /version)
    assert "Backend:                                hpcgate sim, profile fast" in out
    assert doc["settings"]["backend"] == "hpcgate sim, profile fast"


async def test_bench_run_rejects_bad_input_clearly(tmp_path: Path) -> None:
    code, out = await run(hpcgate_cmd("bench", "run", "--base-url", "localhost:8000"), timeout=30)
    assert code == 2 and "--base-url must be http://HOST[:PORT]" in out
    code, out = await run(hpcgate_cmd("bench", "run", "--base-url", "http://127.0.0.1:9",
                                      "--dataset-path", str(tmp_path / "missing.csv")), timeout=30)
    assert code == 2 and "--dataset-path" in out and "Traceback" not in out
    code, out = await run(hpcgate_cmd("bench", "run", "--base-url", "http://127.0.0.1:9", "--num-prompts",
                                      "2", "--result-file", str(tmp_path / "r.json")), timeout=30)
    assert code == 1 and "warm-up request failed" in out and "Traceback" not in out


async def test_quick_overhead_end_to_end(tmp_path: Path) -> None:
    cmd = hpcgate_cmd("bench", "overhead", "--quick", "--out-dir", str(tmp_path))
    code, out = await run(cmd, timeout=100)
    assert code == 0, out
    doc = json.loads((tmp_path / "overhead.json").read_text())
    rows = {(r["target"], r["concurrency"]): r for r in doc["rows"]}
    assert set(rows) == {(t, c) for t in ("direct", "gateway", "nginx") for c in (4, 16)}
    for (target, _), r in rows.items():
        assert "error" not in r, r
        assert (r["completed"], r["failed"]) == (r["requests"], 0)
        if target != "direct":
            assert r["proxy_cpu_s_per_1000"] is not None and r["peak_rss_mb"]
            assert "added_ttft_p50_ms" in r and r["throughput_ratio"] > 0
    assert "proxy CPU s / 1000 req" in (tmp_path / "overhead.md").read_text()


async def test_quick_overhead_of_gateways_behind_a_balancer(tmp_path: Path) -> None:
    """lb-gateway-x2: nginx over two gateway deployments; their CPU and memory count with nginx's."""
    cmd = hpcgate_cmd("bench", "overhead", "--quick", "--targets", "direct,lb-gateway-x2,bogus",
                      "--out-dir", str(tmp_path))
    code, out = await run(cmd, timeout=100)
    assert code == 0, out
    doc = json.loads((tmp_path / "overhead.json").read_text())
    rows = {(r["target"], r["concurrency"]): r for r in doc["rows"]}
    for level in (4, 16):
        balanced = rows[("lb-gateway-x2", level)]
        assert (balanced["completed"], balanced["failed"]) == (balanced["requests"], 0), balanced
        assert len(balanced["peak_rss_mb"]) >= 3  # nginx master + worker, and two gateways at least
        assert "unknown target 'bogus'" in rows[("bogus", level)]["error"]
