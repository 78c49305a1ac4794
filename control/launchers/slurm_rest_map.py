"""Sans-IO mapping between our job specs and slurmrestd's JSON (openapi v0.0.38, later versions).

slurmrestd does not read ``#SBATCH`` lines from a submitted script: the job's properties must
be given as fields of the request. ``sbatch_directives`` reads the directives our renderer wrote
(``#SBATCH --key=value`` before the first command) and ``submit_body`` turns them into the
``job`` object, so one rendered script serves both Slurm launchers. Responses are parsed with
the same job-object parser as ``squeue --json`` (they share Slurm's data parser).

The v0.0.38 request shape is checked against the OpenAPI document of a real slurmrestd 22.05
(``tests/jobs/fixtures/slurmrestd-22.05-job-properties.json``); the shape for later versions
(ranges as ``minimum_nodes``/``maximum_nodes``, numbers as ``{"set", "infinite", "number"}``,
environment as a list) follows their documented data parser but has not run against one.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from control.launchers.base import JobSpec, ObservedJob, SubmitRejectedError
from control.launchers.slurm_parse import SlurmParseError, jobs_from_json, parse_time

# Slurm messages that say "try again later" rather than "this job is wrong".
TEMPORARY_MARKERS = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
                     "temporarily unavailable", "Slurm temporarily unable", "Zero Bytes were transmitted",
                     "Communication connection failure", "Connection timed out", "Connection closed")
_DIRECTIVE_RE = re.compile(r"^#SBATCH\s+--([a-z-]+)(?:=(\S+))?\s*$")
_MEM_RE = re.compile(r"^(\d+)([KMGT]?)$")
_MEM_FACTOR_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def sbatch_directives(script: str) -> dict[str, str]:
    """``--key=value`` of the ``#SBATCH`` lines before the first command (as sbatch reads them)."""
    out: dict[str, str] = {}
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not stripped.startswith("#SBATCH")):
            continue
        if not stripped.startswith("#SBATCH"):
            break
        match = _DIRECTIVE_RE.match(stripped)
        if match:
            out[match.group(1)] = match.group(2) if match.group(2) is not None else "true"
    return out


def _memory_mb(text: str) -> int:
    match = _MEM_RE.match(text)
    if not match:
        raise SubmitRejectedError(f"--mem={text}: not a memory size")
    return max(1, int(int(match.group(1)) * _MEM_FACTOR_MB[match.group(2)]))


def submit_body(spec: JobSpec, api_version: str) -> dict[str, Any]:
    """The ``POST /slurm/{version}/job/submit`` body for ``spec``."""
    d = sbatch_directives(spec.script)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **spec.secret_env}
    job: dict[str, Any] = {
        "name": d.get("job-name", spec.name),
        "current_working_directory": spec.workdir,
        "standard_output": d.get("output", spec.output_path),
        "standard_error": d.get("output", spec.output_path),
        # v0.0.38 takes an object, later versions a list of NAME=VALUE strings.
        "environment": env if api_version == "v0.0.38" else [f"{k}={v}" for k, v in env.items()],
    }
    v38 = api_version == "v0.0.38"  # verified against slurmrestd 22.05's OpenAPI document
    if "nodes" in d:
        nodes = int(d["nodes"])
        if v38:
            job["nodes"] = [nodes, nodes]
        else:
            job["minimum_nodes"] = job["maximum_nodes"] = nodes
    if "ntasks-per-node" in d:
        job["tasks_per_node"] = int(d["ntasks-per-node"])
    if "cpus-per-task" in d:
        job["cpus_per_task"] = int(d["cpus-per-task"])
    if "gpus-per-node" in d:
        gpus = int(d["gpus-per-node"])
        if v38:
            job["gpus_per_node"] = str(gpus)
        else:
            job["tres_per_node"] = f"gres/gpu:{gpus}"
    if "mem" in d:
        mem = _memory_mb(d["mem"])
        job["memory_per_node"] = mem if v38 else {"set": True, "infinite": False, "number": mem}
    if "time" in d:
        try:
            seconds = parse_time(d["time"])
        except SlurmParseError as exc:
            raise SubmitRejectedError(str(exc)) from None
        if seconds is not None:
            minutes = max(1, -(-seconds // 60))  # rounded up
            job["time_limit"] = minutes if v38 else {"set": True, "infinite": False, "number": minutes}
    for key in ("partition", "account", "qos"):
        if key in d:
            job[key] = d[key]
    if "constraint" in d:
        job["constraints"] = d["constraint"]
    if d.get("exclusive") == "true":
        job["exclusive"] = "true" if api_version == "v0.0.38" else ["EXCLUSIVE"]
    return {"script": spec.script, "job": job}


def _errors(doc: Any) -> str | None:
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not errors:
        return None
    parts = []
    for err in errors:
        if isinstance(err, dict):
            parts.append(str(err.get("error") or err.get("description") or err))
        else:
            parts.append(str(err))
    return "; ".join(parts)[:500]


def parse_submit_response(status: int, body: bytes) -> str:
    """The job id of a submit answer; SubmitRejectedError with Slurm's reason otherwise."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise SlurmParseError(f"slurmrestd answered HTTP {status} with non-JSON: {body[:200]!r}") from None
    problem = _errors(doc)
    job_id = doc.get("job_id") if isinstance(doc, dict) else None
    if status == 200 and problem is None and isinstance(job_id, int):
        return str(job_id)
    # slurmrestd answers 500 with Slurm's own error for a refused job: classify by the message.
    if problem is None or any(marker in problem for marker in TEMPORARY_MARKERS):
        raise SlurmParseError(f"slurmrestd failed: HTTP {status}: {problem}")
    raise SubmitRejectedError(f"slurmrestd rejected the job: HTTP {status}: {problem or 'no job id'}")


def parse_jobs_response(status: int, body: bytes, name_prefix: str) -> list[ObservedJob]:
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise SlurmParseError(f"slurmrestd answered HTTP {status} with non-JSON: {body[:200]!r}") from None
    if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SlurmParseError(f"slurmrestd /jobs: HTTP {status}: {_errors(doc) or 'no jobs list'}")
    return jobs_from_json(doc["jobs"], name_prefix)


def cancel_ok(status: int, body: bytes) -> bool:
    """True when the cancel took effect or the job is already gone."""
    if status == 200:
        return True
    text = body.decode("utf-8", "replace")
    gone = ("Invalid job id", "already completing or completed", "Job has already finished")
    return any(marker in text for marker in gone)
