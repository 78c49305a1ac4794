"""``hpcgate control DAEMON``: start one control-plane daemon (each is separately restartable).

Daemons are imported lazily so that, e.g., the job-side ``register`` client starts fast and
pulls in nothing it does not use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# name -> (module exposing main(argv) -> int, one-line help)
DAEMONS: dict[str, tuple[str, str]] = {
    "api": ("control.api.main", "registration API, admin API and Prometheus HTTP SD (granian)"),
    "health": ("control.health.main", "Endpoint Worker: probes, readiness, expiry, publishes tables"),
    "jobs": ("control.jobs.main", "Job Worker: reconciles desired instances with Slurm/local jobs"),
    "batches": ("control.batch.main", "batch runner: Batch API lines through the gateway, as backfill"),
    "autoscaler": ("control.autoscale.main", "Autoscaler: moves desired instances from the engines' queues"),
    "register": ("control.jobs.register_client", "job side: register this job, print its port"),
}


def _usage() -> str:
    lines = ["usage: hpcgate control DAEMON [ARGS...]", "", "daemons:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in DAEMONS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in DAEMONS:
        print(f"hpcgate control: error: unknown daemon {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    entry: Callable[[list[str]], int] = importlib.import_module(DAEMONS[name][0]).main
    return entry(argv[1:])
