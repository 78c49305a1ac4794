"""Slurm output parsers on recorded output: 22.05 recorded on the local cluster, 20.11 / 23.02 /
24.05 shapes written after those versions' formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.launchers.base import JobState, Outcome
from control.launchers.slurm_parse import (
    SlurmParseError,
    format_time,
    job_from_scontrol,
    parse_sbatch_parsable,
    parse_squeue_format,
    parse_squeue_json,
    parse_time,
    state_of,
)

FIX = Path(__file__).parent / "fixtures"


def _read(name: str) -> str:
    return (FIX / name).read_text()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 5400), ("1:30", 90), ("1:00:00", 3600), ("2-00:00:00", 172800), ("1-2", 93600),
     ("1-02:30", 95400), ("365-00:00:00", 31536000), ("UNLIMITED", None), ("INFINITE", None), ("0:45", 45)],
)
def test_parse_time(text: str, seconds: int | None) -> None:
    assert parse_time(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "1:2:3:4", "-5", "1:60:00", "1-25:00:00", "1h"])
def test_parse_time_rejects(bad: str) -> None:
    with pytest.raises(SlurmParseError, match="malformed Slurm time"):
        parse_time(bad)


def test_format_time_round_trips() -> None:
    for seconds in (59, 3600, 93784, 31536000):
        assert parse_time(format_time(seconds)) == seconds


def test_sbatch_parsable() -> None:
    assert parse_sbatch_parsable("1234\n") == "1234"
    assert parse_sbatch_parsable("1234;cluster-a\n") == "1234"
    assert parse_sbatch_parsable("sbatch: warning: x\n77\n") == "77"
    with pytest.raises(SlurmParseError):
        parse_sbatch_parsable("")
    with pytest.raises(SlurmParseError):
        parse_sbatch_parsable("Submitted batch job 5")


def test_squeue_json_22_05_recorded() -> None:
    jobs = {j.name: j for j in parse_squeue_json((FIX / "squeue-22.05.json").read_bytes(), "hpcgate-rec-")}
    assert set(jobs) == {f"hpcgate-rec-m1-g1-e{i}" for i in (1, 2, 3, 4)}  # "hostname" is not ours
    run = jobs["hpcgate-rec-m1-g1-e1"]
    assert (run.launcher_job_id, run.state, run.outcome) == ("2", JobState.RUNNING, None)
    assert run.node == "localhost"
    assert run.time_limit_s == 60 and run.start_time == 1795215898.0
    assert run.output_path == "/tmp/rec/e1.out"
    failed = jobs["hpcgate-rec-m1-g1-e2"]
    assert (failed.state, failed.outcome, failed.exit_code, failed.reason) == (
        JobState.ENDED, Outcome.FAILED, 3, "NonZeroExitCode")
    held = jobs["hpcgate-rec-m1-g1-e3"]
    assert (held.state, held.reason, held.start_time, held.time_limit_s) == (
        JobState.PENDING, "JobHeldUser", None, None)
    cancelled = jobs["hpcgate-rec-m1-g1-e4"]
    assert (cancelled.state, cancelled.outcome) == (JobState.ENDED, Outcome.CANCELLED)


def test_squeue_json_23_02_numbers_as_objects() -> None:
    jobs = {j.name: j for j in parse_squeue_json((FIX / "squeue-23.02.json").read_text(), "hpcgate-llama-")}
    assert set(jobs) == {"hpcgate-llama-g2-e41", "hpcgate-llama-g2-e42", "hpcgate-llama-g2-e39"}
    run = jobs["hpcgate-llama-g2-e41"]
    assert (run.state, run.time_limit_s, run.node) == (JobState.RUNNING, 14400, "gpu017")
    assert run.start_time == 1700000000.0
    assert jobs["hpcgate-llama-g2-e42"].state is JobState.PENDING
    assert jobs["hpcgate-llama-g2-e42"].start_time is None
    timeout = jobs["hpcgate-llama-g2-e39"]
    assert (timeout.state, timeout.outcome, timeout.exit_code) == (JobState.ENDED, Outcome.TIMEOUT, 128 + 15)


def test_squeue_json_24_05_state_lists() -> None:
    jobs = {j.launcher_job_id: j for j in parse_squeue_json(_read("squeue-24.05.json"), "hpcgate-")}
    assert jobs["5512"].state is JobState.RUNNING and jobs["5512"].time_limit_s == 86400
    failed = jobs["5513"]
    assert (failed.state, failed.outcome, failed.exit_code) == (JobState.ENDED, Outcome.FAILED, 3)
    assert jobs["5514"].state is JobState.ENDING and jobs["5514"].time_limit_s is None


def test_squeue_json_errors() -> None:
    with pytest.raises(SlurmParseError, match="invalid JSON"):
        parse_squeue_json("squeue: error: slurm_load_jobs error: Unable to contact", "x")
    with pytest.raises(SlurmParseError, match="no 'jobs' list"):
        parse_squeue_json("{}", "x")
    with pytest.raises(SlurmParseError, match="errors"):
        parse_squeue_json('{"jobs": [], "errors": [{"error": "boom"}]}', "x")


def test_squeue_format_22_05_recorded() -> None:
    jobs = {j.launcher_job_id: j for j in parse_squeue_format(_read("squeue-22.05.fmt"), "hpcgate-")}
    assert set(jobs) == {"2", "3", "4", "5"}
    assert jobs["2"].state is JobState.RUNNING and jobs["2"].time_limit_s == 60
    assert jobs["3"].outcome is Outcome.FAILED and jobs["3"].reason == "NonZeroExitCode"
    assert jobs["4"].state is JobState.PENDING and jobs["4"].time_limit_s is None
    assert jobs["5"].outcome is Outcome.CANCELLED


def test_squeue_format_20_11() -> None:
    jobs = {j.name: j for j in parse_squeue_format(_read("squeue-20.11.fmt"), "hpcgate-mistral-")}
    assert len(jobs) == 4
    assert jobs["hpcgate-mistral-g5-e100"].time_limit_s == 14400
    assert jobs["hpcgate-mistral-g5-e99"].state is JobState.ENDING
    assert jobs["hpcgate-mistral-g4-e98"].outcome is Outcome.TIMEOUT
    with pytest.raises(SlurmParseError):
        parse_squeue_format("garbage line\n", "x")


def test_scontrol_recorded() -> None:
    failed = job_from_scontrol((FIX / "scontrol-22.05-failed.txt").read_text())
    assert (failed.launcher_job_id, failed.name, failed.outcome, failed.exit_code) == (
        "3", "hpcgate-rec-m1-g1-e2", Outcome.FAILED, 3)
    assert failed.output_path == "/tmp/rec/e2.out"
    running = job_from_scontrol((FIX / "scontrol-22.05-running.txt").read_text())
    assert running.state is JobState.RUNNING and running.time_limit_s == 60


def test_unknown_state_is_never_terminal() -> None:
    assert state_of("SOMETHING_NEW")[0] is JobState.ENDING
    assert state_of("CANCELLED+") == (JobState.ENDED, Outcome.CANCELLED)
