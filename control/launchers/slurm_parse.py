"""Sans-IO parsers for Slurm's command output (sbatch, squeue, scontrol) across versions.

Pure functions from text to values: they never run a command and are tested on recorded
output (``tests/jobs/fixtures``). Shapes handled:

- ``squeue --json`` of 21.08/22.05 (openapi v0.0.37/38: ``job_state`` a string, numbers plain
  ints, ``exit_code`` a raw wait status), 23.02 (v0.0.39: numbers as ``{"set", "infinite",
  "number"}``), 23.11+ (v0.0.40/41: ``job_state`` a list of flags, ``exit_code`` an object);
- ``squeue --noheader --format=SQUEUE_FORMAT`` for versions without ``--json`` (<= 21.08);
- ``scontrol show job -o`` (one ``Key=Value`` line per job);
- slurmrestd's job objects (the same data parser as ``squeue --json``).

Invariant: a job whose state this module does not know is reported ENDING, never ENDED, so an
unknown state can delay a decision but never make the worker give up on a live job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import msgspec

from control.launchers.base import JobState, ObservedJob, Outcome

# The fixed format for squeue without --json; the name goes last so that it may contain "|".
SQUEUE_FORMAT = "%i|%T|%l|%S|%N|%r|%j"

_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"}
_RUNNING = {"RUNNING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT", "POWER_UP_NODE"}
_ENDING = {"COMPLETING", "STOPPED"}
_ENDED: dict[str, Outcome] = {
    "COMPLETED": Outcome.COMPLETED,
    "CANCELLED": Outcome.CANCELLED,
    "FAILED": Outcome.FAILED,
    "TIMEOUT": Outcome.TIMEOUT,
    "NODE_FAIL": Outcome.FAILED,
    "BOOT_FAIL": Outcome.FAILED,
    "OUT_OF_MEMORY": Outcome.FAILED,
    "PREEMPTED": Outcome.CANCELLED,
    "DEADLINE": Outcome.TIMEOUT,
    "SPECIAL_EXIT": Outcome.FAILED,
    "REVOKED": Outcome.CANCELLED,
}

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SBATCH_ID_RE = re.compile(r"^(\d+(?:_\d+)?)(?:;[A-Za-z0-9_.-]+)?$")


class SlurmParseError(ValueError):
    """Output that does not have the expected shape; the message quotes what was wrong."""


def parse_time(text: str) -> int | None:
    """Slurm's duration syntax to seconds; None for UNLIMITED/INFINITE/NOT_SET.

    Accepted (as sbatch --time and squeue %l print them): ``M``, ``M:S``, ``H:M:S``, ``D-H``,
    ``D-H:M``, ``D-H:M:S``. Raises SlurmParseError otherwise.
    """
    value = text.strip()
    if value.upper() in {"UNLIMITED", "INFINITE", "NOT_SET", "N/A", "NONE"}:
        return None
    match = _TIME_RE.match(value)
    if not match:
        raise SlurmParseError(f"malformed Slurm time {text!r} (expected e.g. 90, 1:30:00 or 2-00:00:00)")
    days, a, b, c = match.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    hours = minutes = seconds = 0
    if days is not None:
        hours, minutes, seconds = [*nums, 0, 0][:3]  # D-H, D-H:M, D-H:M:S
    elif len(nums) == 1:
        minutes = nums[0]  # M (may exceed 59)
    elif len(nums) == 2:
        minutes, seconds = nums  # M:S
    else:
        hours, minutes, seconds = nums  # H:M:S
    bounded_minutes = days is not None or len(nums) == 3
    if seconds >= 60 or (bounded_minutes and minutes >= 60) or (days is not None and hours >= 24):
        raise SlurmParseError(f"malformed Slurm time {text!r}: a field is out of range")
    total = int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    return total


def format_time(seconds: int) -> str:
    """Seconds as ``D-HH:MM:SS`` (what sbatch --time accepts)."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def parse_sbatch_parsable(stdout: str) -> str:
    """``sbatch --parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``; returns the job id."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise SlurmParseError("sbatch printed no job id")
    match = _SBATCH_ID_RE.match(lines[-1])
    if not match:
        raise SlurmParseError(f"sbatch printed {lines[-1][:200]!r}, not a job id")
    return match.group(1)


def state_of(raw: str) -> tuple[JobState, Outcome | None]:
    """Map one Slurm state name (any version) to ours."""
    name = raw.strip().upper().split()[0] if raw.strip() else ""
    name = name.rstrip("+")  # squeue prints e.g. "CANCELLED+" in some versions
    if name in _PENDING:
        return JobState.PENDING, None
    if name in _RUNNING:
        return JobState.RUNNING, None
    if name in _ENDING:
        return JobState.ENDING, None
    if name in _ENDED:
        return JobState.ENDED, _ENDED[name]
    return JobState.ENDING, None


def _number(value: Any) -> int | None:
    """A plain int (<= 22.05) or ``{"set", "infinite", "number"}`` (>= 23.02); None if unset."""
    if isinstance(value, Mapping):
        if not value.get("set", True) or value.get("infinite", False):
            return None
        value = value.get("number")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    return None


def _state_name(value: Any) -> str:
    """``"RUNNING"`` (<= 23.02) or ``["RUNNING", "COMPLETING"]`` (>= 23.11): the base state."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        names = [str(v) for v in value]
        # The base state comes first; a flag like COMPLETING alone means the job is ending.
        return names[0]
    return ""


def _exit_code(value: Any) -> int | None:
    """The job's exit status: raw wait status (<= 22.05) or ``{"return_code", "signal"}``."""
    if isinstance(value, Mapping):
        code = _number(value.get("return_code"))
        signal = value.get("signal")
        if isinstance(signal, Mapping):
            sig = _number(signal.get("id", signal.get("signal_id")))
            if sig:
                return 128 + sig
        return code
    raw = _number(value)
    if raw is None:
        return None
    # A raw wait(2) status: high byte is the exit code, low 7 bits the signal.
    if raw & 0x7F:
        return 128 + (raw & 0x7F)
    return raw >> 8


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def job_from_json(job: Mapping[str, Any]) -> ObservedJob:
    """One job object of ``squeue --json`` / slurmrestd, any supported version."""
    try:
        job_id = job["job_id"]
        name = job["name"]
    except (KeyError, TypeError) as exc:
        raise SlurmParseError(f"job object without {exc}") from None
    state, outcome = state_of(_state_name(job.get("job_state")))
    limit_min = _number(job.get("time_limit"))
    start = _number(job.get("start_time"))
    reason = _text(job.get("state_reason"))
    return ObservedJob(
        launcher_job_id=str(job_id),
        name=str(name),
        state=state,
        outcome=outcome,
        reason=None if reason in {None, "None"} else reason,
        exit_code=_exit_code(job.get("exit_code")) if state is JobState.ENDED else None,
        node=_text(job.get("batch_host")) or _text(job.get("nodes")),
        start_time=float(start) if start and state is not JobState.PENDING else None,
        time_limit_s=limit_min * 60 if limit_min is not None else None,
        output_path=_text(job.get("standard_output")),
    )


def parse_squeue_json(text: str | bytes, name_prefix: str) -> list[ObservedJob]:
    """``squeue --json`` (or a slurmrestd ``/jobs`` body): our jobs, by name prefix."""
    try:
        doc = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise SlurmParseError(f"squeue --json printed invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SlurmParseError("squeue --json output has no 'jobs' list")
    errors = doc.get("errors") or []
    if errors:
        raise SlurmParseError(f"squeue reported errors: {str(errors)[:300]}")
    return jobs_from_json(doc["jobs"], name_prefix)


def jobs_from_json(jobs: Iterable[Any], name_prefix: str) -> list[ObservedJob]:
    out = []
    for job in jobs:
        if isinstance(job, Mapping) and str(job.get("name", "")).startswith(name_prefix):
            out.append(job_from_json(job))
    return out


def _parse_timestamp(text: str) -> float | None:
    value = text.strip()
    if not value or value in {"N/A", "Unknown", "None", "(null)"}:
        return None
    try:
        # Slurm prints local time without a zone.
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        raise SlurmParseError(f"malformed Slurm timestamp {text!r}") from None


def parse_squeue_format(text: str, name_prefix: str) -> list[ObservedJob]:
    """``squeue --noheader --states=all --format=SQUEUE_FORMAT`` output."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", 6)
        if len(fields) != 7:
            raise SlurmParseError(f"unexpected squeue line {line[:200]!r}")
        job_id, state_text, limit, start, nodes, reason, name = fields
        if not name.startswith(name_prefix):
            continue
        state, outcome = state_of(state_text)
        out.append(
            ObservedJob(
                launcher_job_id=job_id.strip(),
                name=name,
                state=state,
                outcome=outcome,
                reason=None if reason.strip() in {"", "None"} else reason.strip(),
                node=nodes.strip() or None,
                start_time=_parse_timestamp(start) if state is not JobState.PENDING else None,
                time_limit_s=parse_time(limit) if limit.strip() else None,
            )
        )
    return out


def parse_scontrol_fields(text: str) -> dict[str, str]:
    """``scontrol show job -o ID``: ``Key=Value`` pairs (values may contain '=' but no spaces)."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def job_from_scontrol(text: str) -> ObservedJob:
    """One job of ``scontrol show job -o`` as an ObservedJob."""
    f = parse_scontrol_fields(text)
    if "JobId" not in f or "JobState" not in f:
        raise SlurmParseError(f"scontrol output without JobId/JobState: {text[:200]!r}")
    state, outcome = state_of(f["JobState"])
    exit_code = None
    if state is JobState.ENDED and "ExitCode" in f:
        code, _, signal = f["ExitCode"].partition(":")
        if signal.isdigit() and int(signal):
            exit_code = 128 + int(signal)
        elif code.isdigit():
            exit_code = int(code)
    reason = f.get("Reason")
    return ObservedJob(
        launcher_job_id=f["JobId"],
        name=f.get("JobName", ""),
        state=state,
        outcome=outcome,
        reason=None if reason in {None, "None", "(null)"} else reason,
        exit_code=exit_code,
        node=f.get("BatchHost") or None,
        start_time=_parse_timestamp(f.get("StartTime", "")) if state is not JobState.PENDING else None,
        time_limit_s=parse_time(f["TimeLimit"]) if f.get("TimeLimit") else None,
        output_path=f.get("StdOut") or None,
    )


def is_invalid_job_id(stderr: str) -> bool:
    """scancel/scontrol saying the job does not exist (already purged): not an error for cancel."""
    return "Invalid job id" in stderr or "invalid job id" in stderr.lower()

