"""Launcher job names: ``<prefix>-<model>-g<generation>-e<endpoint_job_id>``.

The name is how a job is found again after a restart (the worker looks a job up by name before
submitting it, and cancels jobs with our prefix that no live database row claims), so:
- the prefix is per deployment (``jobs.job_name_prefix``): two deployments sharing a cluster
  must use different prefixes, or each would cancel the other's jobs as orphans;
- the endpoint job id at the end is authoritative; the model part is for people reading squeue
  and is sanitised (Slurm job names should avoid spaces, quotes, slashes).
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MODEL_PART_MAX = 40


def job_name(prefix: str, model: str, generation: int, endpoint_job_id: int) -> str:
    model_part = _UNSAFE.sub("_", model)[:MODEL_PART_MAX] or "model"
    return f"{prefix}-{model_part}-g{generation}-e{endpoint_job_id}"


def name_prefix(prefix: str) -> str:
    """What every job name of this deployment starts with (for Launcher.observe)."""
    return f"{prefix}-"


def endpoint_job_id_of(prefix: str, name: str) -> int | None:
    """The endpoint job id a job name carries, or None if it is not one of ours."""
    if not name.startswith(name_prefix(prefix)):
        return None
    match = re.search(r"-g\d+-e(\d+)$", name)
    return int(match.group(1)) if match else None
