"""Settings of ``hpcgate control jobs`` (section ``jobs``: ``HPCGATE_JOBS_*``, TOML ``[jobs]``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from hpcgate.settings import HttpUrl, LogLevel, PositiveFloat, PostgresUrl

Prefix = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


def default_hpcgate_bin() -> str:
    """The ``hpcgate`` next to this interpreter (the venv's), which jobs on this machine run."""
    return str(Path(sys.executable).with_name("hpcgate"))


class JobsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: PostgresUrl = "postgresql://postgres@127.0.0.1:5432/hpcgate"
    control_url: HttpUrl = "http://127.0.0.1:8081"  # what jobs call to register
    log_level: LogLevel = "info"
    data_dir: str = "/var/tmp/hpcgate"  # default home of job output and local-launcher state

    launcher: Literal["local", "slurm", "slurmrest"] = "local"
    job_name_prefix: Prefix = "hpcgate"  # unique per deployment sharing a cluster
    output_dir: str | None = None  # job output files (a shared filesystem for Slurm); default data_dir/jobs
    template_dirs: tuple[str, ...] = ()  # site templates, searched before slurm/templates
    hpcgate_bin: str | None = None  # the hpcgate jobs run (default: this venv's)

    # local launcher
    local_node: str = "127.0.0.1"  # how gateways reach local jobs
    local_end_with_worker: bool = False  # local jobs get SIGTERM when the worker dies (hpcgate up)
    # Any launcher: a worker stopping after the process that started it died (hpcgate up, killed)
    # cancels every job of this deployment, so Slurm jobs do not outlive it.
    end_jobs_when_orphaned: bool = False
    # Slurm CLI launcher
    ssh_prefix: tuple[str, ...] = ()  # e.g. ssh,-o,BatchMode=yes,svc@login01
    squeue_json: bool | None = None  # None: use --json when the installed squeue has it
    command_timeout_s: PositiveFloat = 30.0
    # slurmrestd launcher
    slurmrest_url: str | None = None  # http(s)://host:6820 or unix:///path/to/slurmrestd.sock
    slurmrest_api_version: Annotated[str, msgspec.Meta(pattern=r"^v0\.0\.\d+$")] = "v0.0.38"
    slurmrest_user: str | None = None  # X-SLURM-USER-NAME
    slurmrest_token: str | None = None  # X-SLURM-USER-TOKEN (JWT); not needed on a local socket

    interval_s: PositiveFloat = 2.0  # full reconcile at least this often (and on table changes)
    walltime_lead_s: NonNegativeFloat = 600.0  # replace a job this long before its time limit
    drain_timeout_s: PositiveFloat = 300.0  # cancel a draining job after this, in flight or not
    drain_grace_s: NonNegativeFloat = 2.0  # let gateways see "draining" before trusting 0 in flight
    cancel_retry_s: PositiveFloat = 30.0
    max_failures: PositiveInt = 3  # start failures in a row before the model is marked failed
    backoff_base_s: PositiveFloat = 10.0  # wait after the 1st failure; doubles, capped
    backoff_max_s: PositiveFloat = 600.0
    registration_ttl_s: PositiveFloat = 3 * 86400.0  # covers time queued in Slurm
    metrics_timeout_s: PositiveFloat = 2.0
    outage_backoff_max_s: PositiveFloat = 10.0
    # A second replica stands by (control/singleton.py): how often it tries the lock, and how
    # often the active one checks its lock session. Kept under 3 s (see that module).
    standby_poll_s: Annotated[float, msgspec.Meta(gt=0, le=2.5)] = 1.0

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.data_dir) / "jobs"

    def resolved_hpcgate_bin(self) -> str:
        return self.hpcgate_bin or default_hpcgate_bin()
