"""``hpcgate bench connections`` at a small size (docs/benchmarks.md records the full one)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.procs import child_env, hpcgate_cmd


def test_connections_measures_memory_per_connection_and_stream(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    proc = subprocess.run(hpcgate_cmd("bench", "connections", "--idle", "300", "--streams", "40",
                                      "--out", str(out)),
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| 300 idle keep-alive connections |" in proc.stdout
    assert "idle connections open: 300/300" in proc.stdout  # progress while it runs
    doc = json.loads(out.read_text())
    assert doc["idle_connections"] == 300 and doc["streams"] == 40
    rss = doc["rss_mib"]
    assert rss["with_idle"] >= rss["before_idle"] > 10 and rss["with_streams"] >= rss["before_streams"] > 10
    bad = subprocess.run(hpcgate_cmd("bench", "connections", "--streams", "0"), env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--streams" in bad.stderr
