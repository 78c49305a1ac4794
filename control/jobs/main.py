"""``hpcgate control jobs``: the Job Worker daemon.

Runs :meth:`JobWorker.reconcile_once` every ``interval_s``, and sooner when PostgreSQL announces
a change to models or jobs (``LISTEN hpcgate_endpoint_table``, sent by triggers of migration
0500), so a new desired count is acted on within milliseconds. A failed pass (PostgreSQL or the
scheduler unreachable) is retried with capped, jittered backoff; the outage is logged once and
the recovery once. Stops cleanly on SIGINT/SIGTERM; the jobs themselves keep running and are
found again by name on the next start, unless ``end_jobs_when_orphaned`` is set (``hpcgate up``)
and the process that started the worker has died: then it cancels them as it stops.

One replica acts at a time: :class:`control.singleton.SingletonLock` runs :func:`run` only while
this process holds the ``control-jobs`` advisory lock; a second replica stands by and takes over
within ``standby_poll_s`` when the first dies.

Prints ``{"event": "jobs_worker_started", ...}`` on stderr once it has connected.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import sys
from pathlib import Path

import asyncpg

from control.jobs.reconcile import JobWorker
from control.jobs.settings import JobsSettings
from control.launchers.base import Launcher, LauncherError
from control.reconcile_rhythm import ReconcileRhythm
from control.singleton import SingletonLock
from hpcgate.lifecycle import install_stop_signals, parent_has_died
from hpcgate.logs import get_logger, setup_logging
from hpcgate.settings import load_settings

log = get_logger("hpcgate.control.jobs")
NOTIFY_CHANNEL = "hpcgate_endpoint_table"
# Payloads (table names) that can change a plan. Endpoint rows change on every probe round
# (last_probe_at); readiness also moves the job row, so those notifications can be ignored.
WAKE_TABLES = frozenset({"ai_model_configurations", "ai_model_endpoint_jobs"})
MIN_PASS_SPACING_S = 0.25  # bounds squeue/slurmrestd load when notifications are frequent
# Errors that end a pass early; the next pass (after backoff) redoes it.
_TEMPORARY = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, LauncherError, TimeoutError)


def make_launcher(settings: JobsSettings) -> Launcher:
    if settings.launcher == "local":
        from control.launchers.local import LocalLauncher

        return LocalLauncher(Path(settings.data_dir) / "jobs" / "local-state", node=settings.local_node,
                             end_with_worker=settings.local_end_with_worker)
    if settings.launcher == "slurm":
        from control.launchers.slurm_cli import SlurmCliLauncher

        return SlurmCliLauncher(settings.ssh_prefix, settings.command_timeout_s, settings.squeue_json)
    from control.launchers.slurm_rest import SlurmRestLauncher

    if not settings.slurmrest_url:
        from hpcgate.settings import SettingsError

        raise SettingsError("missing setting HPCGATE_JOBS_SLURMREST_URL: required by launcher slurmrest")
    return SlurmRestLauncher(settings.slurmrest_url, settings.slurmrest_api_version,
                             settings.slurmrest_user, settings.slurmrest_token, settings.command_timeout_s)


async def run(settings: JobsSettings, stop: asyncio.Event) -> None:
    launcher = make_launcher(settings)
    if not settings.ssh_prefix:
        settings.resolved_output_dir().mkdir(parents=True, exist_ok=True)
    wake = asyncio.Event()
    rhythm = ReconcileRhythm("jobs_worker", log, settings.interval_s, settings.outage_backoff_max_s)
    pool: asyncpg.Pool | None = None
    worker: JobWorker | None = None
    listener: asyncpg.Connection | None = None
    started_by = os.getppid()
    log.info("jobs_worker_started", launcher=launcher.kind, job_name_prefix=settings.job_name_prefix,
             output_dir=str(settings.resolved_output_dir()),
             ssh_prefix=shlex.join(settings.ssh_prefix) if settings.ssh_prefix else None)
    try:
        while not stop.is_set():
            try:
                if pool is None or worker is None:
                    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4,
                                                     command_timeout=30)
                    worker = JobWorker(settings, pool, launcher)
                if listener is None or listener.is_closed():
                    listener = await asyncpg.connect(settings.database_url)
                    await listener.add_listener(NOTIFY_CHANNEL, functools.partial(_on_notify, wake))
                wake.clear()
                await worker.reconcile_once()
                delay = rhythm.after_success()
            except _TEMPORARY as exc:
                if isinstance(exc, (OSError, asyncpg.InterfaceError)) and not isinstance(exc, LauncherError):
                    await _close(listener)
                    listener = None
                delay = rhythm.after_failure(exc)
            stop_wait = asyncio.ensure_future(stop.wait())
            wake_wait = asyncio.ensure_future(wake.wait())
            await asyncio.wait({stop_wait, wake_wait}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            wake_wait.cancel()
            if wake.is_set() and not stop.is_set():
                await asyncio.sleep(MIN_PASS_SPACING_S)  # coalesce a burst of notifications
    finally:
        await _close(listener)
        if pool is not None:
            await pool.close()
        if settings.end_jobs_when_orphaned and parent_has_died(started_by):
            await _end_jobs_of_a_dead_parent(launcher, settings)
        await launcher.close()
        log.info("jobs_worker_stopped")


async def _end_jobs_of_a_dead_parent(launcher: Launcher, settings: JobsSettings) -> None:
    """The process that started this worker (``hpcgate up``) died without ending its instances:
    cancel every live job of this deployment, so none holds its GPUs until its time limit. The
    database is left as it is: the next start finds the rows and the ended jobs."""
    try:
        async with asyncio.timeout(settings.command_timeout_s):
            live = [j for j in await launcher.observe(settings.job_name_prefix) if j.alive]
            for job in live:
                await launcher.cancel(job.launcher_job_id)
    except (LauncherError, OSError, TimeoutError) as exc:
        log.error("jobs_not_ended_with_parent", launcher=launcher.kind,
                  error=str(exc)[:500] or type(exc).__name__)
        return
    log.warning("jobs_ended_with_parent", launcher=launcher.kind,
                launcher_job_ids=[j.launcher_job_id for j in live])


def _on_notify(wake: asyncio.Event, _conn: object, _pid: int, _channel: str, payload: str) -> None:
    if payload in WAKE_TABLES:
        wake.set()


async def _close(conn: asyncpg.Connection | None) -> None:
    if conn is not None and not conn.is_closed():
        try:
            await asyncio.wait_for(conn.close(), 2)
        except (OSError, TimeoutError, asyncpg.InterfaceError):
            conn.terminate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcgate control jobs",
        description="The Job Worker: reconciles desired model instances with Slurm or local jobs.")
    parser.add_argument("--launcher", choices=("local", "slurm", "slurmrest"), default=None,
                        help="where instances run: local processes, sbatch/squeue, or slurmrestd "
                        "(default local, setting jobs.launcher)")
    parser.add_argument("--interval", type=float, default=None, dest="interval_s", metavar="SECONDS",
                        help="a full reconcile at least this often (default 2, setting jobs.interval_s)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(JobsSettings, "jobs", overrides={"launcher": args.launcher,
                                                               "interval_s": args.interval_s})
    setup_logging(settings.log_level)
    if settings.launcher == "slurmrest" and not settings.slurmrest_url:
        print("hpcgate control jobs: missing setting HPCGATE_JOBS_SLURMREST_URL", file=sys.stderr)
        return 2

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        install_stop_signals(loop, stop.set)  # the pass in progress finishes; a second signal exits
        lock = SingletonLock(settings.database_url, "control-jobs", poll_s=settings.standby_poll_s)
        await lock.run(functools.partial(run, settings), stop)

    asyncio.run(_main())
    return 0
