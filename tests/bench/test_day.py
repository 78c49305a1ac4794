"""``hpcgate bench day`` as docs/benchmarks.md shows its short run: a half-minute day against a
model with the default schedule on a live stack. Every request is answered, the schedule's
window opens at 08:00 of the simulated day (not at the wall clock's hour), and the results,
the summary table and the GPU-hours are written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import HPCGATE

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def test_the_documented_short_day_runs(tmp_path: Path) -> None:
    lines = re.findall(r"^hpcgate bench day --day-minutes 0.5 .*$", DOC.read_text(), re.MULTILINE)
    assert len(lines) == 1, "docs/benchmarks.md lost its short day run"
    argv = [HPCGATE, *shlex.split(lines[0])[1:], "--out-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    progress = re.findall(r"^\[scheduled\] \d\d:\d\d  load ", done.stderr, re.MULTILINE)
    assert len(progress) >= 12, done.stderr[-3000:]  # a line per hour of the day, about

    doc = json.loads((tmp_path / "results.json").read_text())
    day_s = doc["settings"]["day_minutes"] * 60
    run = doc["runs"]["scheduled"]
    result = run["result"]
    assert result["requests"] == len(doc["arrivals"]) > 100
    assert result["failed"] == 0, run["errors"]
    assert 0 < result["gpu_hours"] < 24 * doc["settings"]["max_instances"]
    # the default schedule: weekdays 08:00-17:00 Europe/Berlin: min 3
    opened = [d for d in run["decisions"] if d["reason"] == "schedule" and d["to_instances"] == 3]
    assert opened, run["decisions"]
    hour = 24 * opened[0]["at"] / day_s
    assert 8 <= hour < 10.5, f"the schedule's window opened at {hour:.2f} h of the simulated day"
    working = [s for s in run["samples"] if 10.5 <= 24 * s[0] / day_s < 17]
    assert working and all(s[1] >= 3 for s in working)  # desired held at the schedule's min 3
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("| configuration | GPU-hours | vs scheduled |")
    assert "| scheduled |" in summary


def test_bad_options_end_with_the_reason_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.day import cmd_day
    from bench.main import build_parser

    for args, reason in [
        (["--configs", "static,weekly"], "--configs: unknown weekly"),
        (["--schedule", "weekdays 08:00-19:00 Mars/Olympus: min 2"], "unknown time zone 'Mars/Olympus'"),
        (["--tz", "Nowhere/Else"], "--tz / --date"),
        (["--date", "2026-13-01"], "--tz / --date"),
        (["--day-minutes", "0"], "--day-minutes and --peak-rps must be > 0"),
    ]:
        parsed = build_parser().parse_args(["day", *args])
        assert cmd_day(parsed, "unused-results-dir") == 2, args
        assert reason in capsys.readouterr().err, args
