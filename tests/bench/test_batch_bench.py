"""``hpcgate bench batch`` as docs/benchmarks.md shows its short run: it completes and its
results name a finished batch, a direct run and both interactive runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from tests.support.procs import HPCGATE

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def test_the_documented_short_batch_bench_runs(tmp_path: Path) -> None:
    lines = re.findall(r"^hpcgate bench batch --lines .*$", DOC.read_text(), re.MULTILINE)
    assert len(lines) == 1, "docs/benchmarks.md lost its short batch run"
    argv = [HPCGATE, *shlex.split(lines[0])[1:], "--result-file", str(tmp_path / "r.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["batch"]["status"] == "completed" and doc["batch"]["completed"] == 300
    assert doc["direct"]["failed"] == 0 and doc["batch"]["ratio_to_direct"] > 0
    assert doc["interactive"]["alone"]["failed"] == 0 and doc["interactive"]["with_batch"]["failed"] == 0
    assert doc["interactive"]["with_batch"]["batch_status"] == "completed"
