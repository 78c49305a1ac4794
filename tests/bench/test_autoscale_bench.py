"""``hpcgate bench autoscale`` as docs/benchmarks.md shows its quick check: the overload
leads to one scale-up decision, and every phase from detection to the first routed request is
measured (non-negative, adding up to the total)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import HPCGATE

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def test_the_documented_autoscale_bench_runs(tmp_path: Path) -> None:
    shown = r"^hpcgate bench autoscale --threshold-s 1 .*?(?=\s+#|$)"  # the command, not its comment
    lines = re.findall(shown, DOC.read_text(), re.MULTILINE)
    assert len(lines) == 1, "docs/benchmarks.md lost its quick autoscale check"
    argv = [HPCGATE, *shlex.split(lines[0])[1:], "--result-file", str(tmp_path / "r.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["decision"] == "1 -> 2 (queue_time_sustained)"
    phases = doc["phases"]
    parts = ["detection_s", "submit_s", "start_s", "ready_s", "routed_s"]
    assert all(phases[p] >= 0 for p in parts), phases
    assert sum(phases[p] for p in parts) == pytest.approx(phases["total_s"], abs=0.06)
    assert phases["detection_s"] >= 3  # the sustain window, at least
