"""Slurm through its command-line tools: sbatch, squeue, scancel (optionally over SSH).

With ``ssh_prefix`` (e.g. ``("ssh", "-o", "BatchMode=yes", "svc@login01")``) every command runs
on a login node, the paper's "Slurm Submit" service; the command line is then quoted once for
the remote shell. The job script goes to ``sbatch`` on stdin (nothing to copy to the login
node) after the secret environment lines, which a tiny bash prelude exports before ``exec
sbatch`` — so secrets never appear on a command line (``ps``) on either machine, and reach
the job through sbatch's default ``--export=ALL``.

``squeue --json`` is used where the installed Slurm has it (21.08+), with a fallback to a fixed
``--format`` remembered after the first "unrecognized option". Output parsing is in
:mod:`control.launchers.slurm_parse`; this module only runs commands and classifies errors.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Sequence

from control.launchers.base import JobSpec, LauncherError, ObservedJob, SubmitRejectedError
from control.launchers.slurm_parse import (
    SQUEUE_FORMAT,
    SlurmParseError,
    is_invalid_job_id,
    parse_sbatch_parsable,
    parse_squeue_format,
    parse_squeue_json,
)
from control.launchers.slurm_rest_map import TEMPORARY_MARKERS

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_ID_RE = re.compile(r"^\d+(?:_\d+)?$")
_TEMPORARY = (*TEMPORARY_MARKERS, "ssh:")
# Read secret NAME=VALUE lines from stdin (ended by an empty line), then hand the rest of
# stdin (the script) to sbatch. bash's `read` consumes exactly one line from a pipe.
_SUBMIT_PRELUDE = 'while IFS= read -r _l && [ -n "$_l" ]; do export "$_l"; done; exec sbatch --parsable "$@"'


def classify_sbatch_error(stderr: str) -> LauncherError:
    text = " ".join(stderr.split())[:500] or "sbatch failed without a message"
    if any(marker in stderr for marker in _TEMPORARY):
        return LauncherError(f"sbatch: {text}")
    return SubmitRejectedError(f"sbatch rejected the job: {text}")


class SlurmCliLauncher:
    kind = "slurm"

    def __init__(self, ssh_prefix: Sequence[str] = (), command_timeout_s: float = 30.0,
                 use_json: bool | None = None) -> None:
        self._ssh = tuple(ssh_prefix)
        self._timeout = command_timeout_s
        self._use_json = use_json  # None: try --json, fall back to --format once refused

    async def _run(self, argv: Sequence[str], stdin: bytes | None = None) -> tuple[int, str, str]:
        cmd = [*self._ssh, shlex.join(argv)] if self._ssh else list(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise LauncherError(f"cannot run {cmd[0]}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self._timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise LauncherError(f"{argv[0]} did not finish within {self._timeout:g}s") from None
        return proc.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    async def submit(self, spec: JobSpec) -> str:
        for name, value in spec.secret_env.items():
            if not _ENV_NAME_RE.match(name) or "\n" in value or not value:
                raise LauncherError(f"secret_env {name!r}: invalid name or value")
        stdin = "".join(f"{k}={v}\n" for k, v in spec.secret_env.items()) + "\n" + spec.script
        argv = ["bash", "-c", _SUBMIT_PRELUDE, "hpcgate-submit", f"--chdir={spec.workdir}"]
        rc, out, err = await self._run(argv, stdin.encode())
        if rc != 0:
            raise classify_sbatch_error(err)
        try:
            return parse_sbatch_parsable(out)
        except SlurmParseError as exc:
            raise LauncherError(str(exc)) from None

    async def observe(self, name_prefix: str) -> list[ObservedJob]:
        if self._use_json is not False:
            rc, out, err = await self._run(["squeue", "--json"])
            if rc == 0:
                self._use_json = True
                try:
                    return parse_squeue_json(out, name_prefix)
                except SlurmParseError as exc:
                    raise LauncherError(str(exc)) from None
            if self._use_json is None and ("unrecognized option" in err or "invalid option" in err):
                self._use_json = False
            else:
                raise LauncherError(f"squeue --json failed: {' '.join(err.split())[:300]}")
        rc, out, err = await self._run(["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"])
        if rc != 0:
            raise LauncherError(f"squeue failed: {' '.join(err.split())[:300]}")
        try:
            return parse_squeue_format(out, name_prefix)
        except SlurmParseError as exc:
            raise LauncherError(str(exc)) from None

    async def cancel(self, launcher_job_id: str) -> None:
        if not _JOB_ID_RE.match(launcher_job_id):
            raise LauncherError(f"not a Slurm job id: {launcher_job_id!r}")
        rc, _, err = await self._run(["scancel", launcher_job_id])
        # scancel exits 0 for most finished jobs; "Invalid job id" means it was purged already.
        if rc != 0 and not is_invalid_job_id(err) and "already completing or completed" not in err:
            raise LauncherError(f"scancel {launcher_job_id}: {' '.join(err.split())[:300]}")

    async def read_output(self, job: ObservedJob, max_bytes: int = 4096) -> str | None:
        if not job.output_path:
            return None
        rc, out, _ = await self._run(["tail", "-c", str(max_bytes), job.output_path])
        return out if rc == 0 else None

    async def close(self) -> None:
        return None
