"""``hpcgate bench chaos``: the pure judge fed with data, and the quick profile run for real.

The quick run is the command docs/benchmarks.md shows, as written: the whole stack with private
PostgreSQL and Redis, every fault once, mixed load for three tenants. Its invariants are
asserted from the JSON it writes, and the pure tests below show each of them trips when the
data breaks it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from bench.chaos_plan import (
    FAULT_KINDS,
    PROFILES,
    REQUEST_KINDS,
    Fault,
    Outcome,
    Resources,
    build_report,
    classify,
    client_recovery,
    expected_usage,
    format_table,
    min_ready,
    parse_faults,
    request_kind,
    resources_check,
    schedule,
    usage_check,
)
from tests.support.procs import child_env, hpcgate_cmd

pytestmark = pytest.mark.serial  # timing-sensitive: ./dev.sh test runs it after the parallel rest

ROOT = Path(__file__).resolve().parents[2]
QUICK = "hpcgate bench chaos --quick"
READY = [(0.0, 2), (10.0, 1), (12.0, 0), (14.0, 2)]


def ok(kind: str = "chat_stream", tenant: str = "a", start: float = 1.0, end: float = 1.5,
       **kw: object) -> Outcome:
    o = Outcome(kind=kind, tenant=tenant, start=start, end=end, status=200, got_bytes=True, complete=True,
                prompt_tokens=10, completion_tokens=5, data_events=7)
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def test_each_request_gets_the_category_its_client_saw() -> None:
    assert classify(ok(), READY, []) == "ok"
    assert classify(ok(timed_out=True), READY, []) == "hung"
    assert classify(ok(complete=False, error_event=True), READY, []) == "cut_with_error_event"
    assert classify(ok(complete=False), READY, []) == "cut_without_event"
    # a connection a killed gateway worker took with it, stream or not
    assert classify(ok(complete=False, start=4.0, end=5.2), READY, [5.0]) == "lost_with_gateway_worker"
    assert classify(ok(kind="chat", status=0, got_bytes=False, start=4.0, end=5.0), READY, [5.0]) \
        == "lost_with_gateway_worker"
    # ... but not a failure long after the kill
    assert classify(ok(kind="chat", status=0, got_bytes=False, start=7.0, end=8.0), READY, [5.0]) \
        == "failed_while_ready"
    assert classify(ok(kind="chat", status=502, complete=False), READY, []) == "failed_while_ready"
    assert classify(ok(kind="chat", status=503, complete=False), READY, []) == "failed_while_ready"
    assert classify(ok(kind="chat", status=503, complete=False, start=12.5, end=13.0, retry_after=True),
                    READY, []) == "rejected_503"
    assert classify(ok(kind="chat", status=503, complete=False, start=12.5, end=13.0), READY, []) \
        == "rejected_503_without_retry_after"
    assert classify(ok(kind="chat", status=502, complete=False, start=12.5, end=13.0), READY, []) \
        == "failed_none_ready"
    assert classify(ok(kind="chat", status=401, complete=False), READY, []) == "client_error"
    assert min_ready(READY, 9.0, 11.0) == 1 and min_ready(READY, 11.0, 15.0) == 0 and min_ready([], 0, 1) == 0


def test_usage_must_match_to_the_token() -> None:
    outcomes = [ok(), ok(tenant="b", end=4.9), ok(complete=False, error_event=True, data_events=4),
                ok(kind="embedding", completion_tokens=0), ok(status=503, complete=False)]
    assert expected_usage(outcomes) == {"a": (20, 5 + 3), "b": (10, 5)}  # the cut stream: 4 events - 1
    table, problems = usage_check(outcomes, {"a": (20, 8), "b": (10, 5)})
    assert problems == [] and table["a"]["lost"] == 0
    _, problems = usage_check(outcomes, {"a": (20, 8)})  # b's usage never written
    assert problems == ["tenant b: 15 tokens lost (0+0 in PostgreSQL, clients received 10+5)"]
    _, problems = usage_check(outcomes, {"a": (20, 7), "b": (10, 5)})
    assert problems and "1 tokens lost" in problems[0]
    _, problems = usage_check(outcomes, {"a": (20, 9), "b": (10, 5)})
    assert problems and "more than clients received" in problems[0]


def test_resources_must_stay_flat() -> None:
    steady = Resources(rss_mib=[100.0] * 20, fds=[50] * 20, fds_idle_before=40, fds_idle_after=50)
    assert resources_check(steady, pooled_max=24)[1] == []
    leaking = Resources(rss_mib=[100.0 + 10 * i for i in range(20)], fds=[50] * 20, fds_idle_before=40,
                        fds_idle_after=400)
    problems = resources_check(leaking, pooled_max=24)[1]
    assert len(problems) == 2 and "RSS grew" in problems[0] and "descriptors grew" in problems[1]


def test_the_report_names_every_broken_invariant() -> None:
    profile = PROFILES["quick"]
    faults = [Fault("kill_instance", 2.0, 1.5, "port 1"), Fault("stall_instance", 8.0, None, "port 2")]
    outcomes = [ok(), ok(kind="chat", status=502, complete=False, start=3.0, end=3.5),
                ok(start=8.5, end=40.0, complete=False, timed_out=True)]
    report = build_report(profile=profile, outcomes=outcomes, faults=faults, timeline=[(0.0, 2)],
                          recorded={"a": (30, 15)}, resources=Resources(),
                          jobs={"live_jobs": 2}, job_problems=["1 live jobs at the end, 2 desired"],
                          duration_s=41.0)
    assert report["failed_while_ready"] == 1
    assert report["violations"] == [
        "1 request(s) hung", "1 request(s) failed while ready",
        "stall_instance at 8.0s: not recovered within 40s",
        "tenant a: PostgreSQL holds more than clients received (30+15 > 10+5)",
        "1 live jobs at the end, 2 desired"]
    assert [f["client_recovery_s"] for f in report["faults"]] == [1.5, 32.0]  # type: ignore[attr-defined,index]
    text = format_table(report)
    assert "VIOLATIONS:" in text and "stall_instance" in text and "NOT" in text
    clean = build_report(profile=profile, outcomes=[ok()], faults=[], timeline=[(0.0, 2)],
                         recorded={"a": (10, 5)}, resources=Resources(), jobs={},
                         job_problems=[], duration_s=2.0)
    assert clean["violations"] == [] and "invariants: all hold" in format_table(clean)
    assert client_recovery([ok()], faults[0], faults, [(0.0, 2)], []) == 0.0


def test_schedule_faults_and_mix() -> None:
    assert parse_faults("kill_instance, stall_instance") == ("kill_instance", "stall_instance")
    with pytest.raises(ValueError, match="unknown fault 'reboot'"):
        parse_faults("kill_instance,reboot")
    assert schedule(FAULT_KINDS, 500.0, 0, 0.0) and not schedule(FAULT_KINDS, 1.0, 1, 0.0)
    assert schedule(FAULT_KINDS, 100.0, 3, 420.0) and not schedule((), 0.0, 0, 420.0)
    assert {request_kind(n) for n in range(10)} == set(REQUEST_KINDS)
    for profile in PROFILES.values():  # streams on a stalled instance must outlast the 3 s read timeout
        assert profile.stall_s > 3


def test_the_command_refuses_bad_options() -> None:
    from bench.main import build_parser

    assert isinstance(build_parser().parse_args(["chaos", "--quick"]), argparse.Namespace)
    run = subprocess.run(hpcgate_cmd("bench", "chaos", "--faults", "reboot"), capture_output=True, text=True,
                         env=child_env(), timeout=60)
    assert run.returncode == 2 and "unknown fault 'reboot'" in run.stderr


def test_quick_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    """The documented quick run, as written; it exits 0 only when every invariant holds, and
    the JSON says what happened."""
    assert f"\n{QUICK}\n" in (ROOT / "docs" / "benchmarks.md").read_text()
    run = subprocess.run(["bash", "-c", QUICK], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=child_env(PATH=f"{Path(hpcgate_cmd()[0]).parent}:/usr/bin:/bin",
                                       HPCGATE_BENCH_RESULTS_DIR=str(tmp_path)))
    out = run.stdout + run.stderr
    results = list(tmp_path.glob("chaos-*.json"))
    assert results, out[-4000:]
    report = json.loads(results[0].read_text())
    assert report["violations"] == [] and run.returncode == 0, out[-4000:]
    assert "invariants: all hold" in run.stdout
    assert [f["kind"] for f in report["faults"]] == list(FAULT_KINDS)
    assert all(f["recovery_s"] is not None for f in report["faults"])
    req = report["requests"]
    assert set(req["by_kind"]) == set(REQUEST_KINDS) and all(k["ok"] > 0 for k in req["by_kind"].values())
    assert report["failed_while_ready"] == 0
    assert report["cut_midstream"]["without_error_event"] == 0 and report["cut_midstream"]["hung"] == 0
    assert report["rejected_503"]["without_retry_after"] == 0
    assert len(report["usage"]) == 3
    for tenant in report["usage"].values():
        assert tenant["lost"] == 0, report["usage"]
    jobs = report["jobs"]
    assert jobs["live_jobs"] == jobs["desired"] == jobs["instance_processes"] == 2
    assert jobs["killed_instances"] == 1
    assert report["resources"]["rss_mib"]["flat"] and report["resources"]["fds"]["flat"]
    # nothing of the run is left behind: no instance, no private PostgreSQL or Redis
    block = jobs["port_block"]
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        assert not any(f"--port {port}" in cmd for port in range(block, block + 100)), cmd
        assert "hpcgate-chaos-" not in cmd, cmd
