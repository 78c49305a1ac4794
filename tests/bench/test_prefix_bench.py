"""The prefix workloads (pure) and ``hpcgate bench prefix`` run end to end at a tiny scale."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.conversations import build, multi_turn, no_sharing, shared_prefix
from bench.sim.textgen import count_tokens
from tests.support.procs import child_env, hpcgate_cmd


def test_multi_turn_conversations_have_their_own_history() -> None:
    wl = multi_turn(3, turns=4, system_tokens=50, question_tokens=20)
    assert wl.requests == 12 and len({c.system for c in wl.conversations}) == 3
    conv = wl.conversations[0]
    assert count_tokens(conv.system) == 50 and all(count_tokens(q) == 20 for q in conv.questions)
    assert len(set(conv.questions)) == 4


def test_shared_prefix_groups_share_exactly_their_prefix() -> None:
    wl = shared_prefix(3, 4, prefix_tokens=100, question_tokens=10)
    assert wl.requests == 12
    assert len({c.system for c in wl.conversations}) == 3  # one prefix per group
    assert wl.conversations[0].system == wl.conversations[3].system  # interleaved groups
    assert len({c.questions for c in wl.conversations}) == 12


def test_no_sharing_has_nothing_in_common() -> None:
    wl = no_sharing(5, prompt_tokens=40)
    firsts = {c.system.split()[0] for c in wl.conversations}
    assert len(firsts) == 5  # differ from the first word (the simulator's first block) on
    with pytest.raises(ValueError, match="unknown workload"):
        build("nope")


def test_bench_prefix_runs_and_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "prefix.json"
    # the smoke command of docs/benchmarks.md ("Cache-aware routing"), as written there
    args = ["bench", "prefix", "--workload", "multi-turn", "--instances", "2", "--profile", "fast",
            "--users", "2", "--scale", "0.05"]
    doc_text = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text()
    assert "hpcgate " + " ".join(args) in doc_text
    done = subprocess.run([*hpcgate_cmd(*args), "--result-file", str(out)], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    runs = row["runs"]
    assert set(runs) == {"least-queue", "cache-aware"}
    for r in runs.values():
        assert r["completed"] == r["requests"] == 24 and r["errors"] == 0  # 3 conversations x 8 turns
    assert runs["cache-aware"]["engine_hit_ratio"] > 0.3  # later turns found their history
    assert runs["cache-aware"]["router_hit_estimate"] > 0
    assert runs["least-queue"]["router_hit_estimate"] is None
    assert "median TTFT least-queue / cache-aware" in done.stdout
