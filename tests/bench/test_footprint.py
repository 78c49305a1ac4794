"""``hpcgate bench footprint`` on the test environment (the docs record its numbers for a fresh base
install; installing one here would take minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.procs import child_env, hpcgate_cmd


def test_footprint_measures_an_environment() -> None:
    proc = subprocess.run(hpcgate_cmd("bench", "footprint", "--venv", sys.prefix, "--repeats", "1"),
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["packages"] > 10 and doc["size_mib"] > 1
    assert 0 < doc["import_ms"] < 10_000 and 0 < doc["start_ms"] < 30_000
