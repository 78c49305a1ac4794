"""Local processes as a launcher: the embedded default of ``hpcgate up`` (one machine, no Slurm).

Runs the same rendered job script with bash, in its own session (process group), with stdout
and stderr appended to the spec's output file. Everything needed to observe or cancel a job
after the worker restarts lives in ``state_dir``:

- ``<id>.json``: name, pid, the pid's start time (``/proc/<pid>/stat`` field 22, so a reused
  pid is never mistaken for the job), time limit, cancel/timeout marks;
- ``<id>.rc``: the script's exit status, written by a small bash wrapper when the script ends
  (the wrapper traps SIGTERM so that a cancel still records the status).

Like Slurm, a job past its time limit is terminated (on the next ``observe``), a cancelled job
gets SIGTERM and, ``kill_wait_s`` later, SIGKILL; ended jobs are forgotten after
``keep_ended_s``. Secrets reach the job over its stdin (read by the wrapper into the
environment), never on a command line.

With ``end_with_worker`` (``hpcgate up`` sets it) the wrapper is started under ``setpriv
--pdeathsig HUP``: when the worker that started it dies, even of SIGKILL, the wrapper gets
SIGHUP and sends SIGTERM to its job's process group. Without it (the default) jobs outlive a
worker restart and the next worker finds them by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import msgspec

from control.launchers.base import JobSpec, JobState, LauncherError, ObservedJob, Outcome

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# $1: script, $2: rc file, $3: pid file. Secrets come as NAME=VALUE lines on stdin, ended by
# an empty line. The wrapper records its own pid first, so a job started by a worker that is
# killed before it could write the pid down is still found (and cancelled) by the next one.
_WRAPPER = r"""
echo "$$" > "$3.tmp" && mv "$3.tmp" "$3"
while IFS= read -r _line && [ -n "$_line" ]; do export "$_line"; done
exec </dev/null
trap 'true' TERM
trap 'kill -TERM 0' HUP
bash "$1" &
_child=$!
while :; do wait "$_child"; _rc=$?; kill -0 "$_child" 2>/dev/null || break; done
echo "$_rc" > "$2.tmp" && mv "$2.tmp" "$2"
"""


class _Record(msgspec.Struct, kw_only=True):
    job_id: str
    name: str
    pid: int = 0  # 0: not known yet (see _WRAPPER and _resolve_pid)
    proc_start: int = 0
    started_at: float
    output_path: str
    time_limit_s: int | None = None
    cancel_requested_at: float | None = None
    killed_at: float | None = None
    timed_out: bool = False
    ended_at: float | None = None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


class LocalLauncher:
    kind = "local"

    def __init__(self, state_dir: Path, node: str = "127.0.0.1", kill_wait_s: float = 5.0,
                 keep_ended_s: float = 3600.0, end_with_worker: bool = False) -> None:
        self._dir = state_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._node = node
        self._kill_wait_s = kill_wait_s
        self._keep_ended_s = keep_ended_s
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # reaped on observe
        # The parent-death signal fires when the thread that forked dies: submit() runs on the
        # event loop's thread, which lives as long as the worker. Without setpriv (not
        # util-linux) jobs outlive the worker; ``hpcgate up`` still ends them on its next start.
        setpriv = shutil.which("setpriv") if end_with_worker else None
        self._prefix = [setpriv, "--pdeathsig", "HUP"] if setpriv else []
        self.ends_with_worker = bool(self._prefix)

    def _path(self, job_id: str, suffix: str) -> Path:
        return self._dir / f"{job_id}{suffix}"

    def _save(self, rec: _Record) -> None:
        tmp = self._path(rec.job_id, ".json.tmp")
        tmp.write_bytes(msgspec.json.encode(rec))
        tmp.replace(self._path(rec.job_id, ".json"))

    # The async methods call these synchronous ones directly: they touch only local files and
    # fork one process, which takes well under a millisecond; a thread would cost more.

    async def submit(self, spec: JobSpec) -> str:
        return self._submit(spec)

    def _submit(self, spec: JobSpec) -> str:
        for name, value in spec.secret_env.items():
            if not _ENV_NAME_RE.match(name) or "\n" in value or not value:
                raise LauncherError(f"secret_env {name!r}: invalid name or value")
        job_id = f"local-{uuid.uuid4().hex[:12]}"
        script = self._path(job_id, ".sh")
        script.write_text(spec.script)
        rc_file = self._path(job_id, ".rc")
        Path(spec.output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        env_lines = {"HPCG_LOCAL_JOB_ID": job_id, "HPCG_LOCAL_NODE": self._node, **spec.secret_env}
        stdin = "".join(f"{k}={v}\n" for k, v in env_lines.items()) + "\n"
        # The record exists before the process does: a crash in between leaves a job the next
        # observe() can see (through the pid file the wrapper writes), never an untracked one.
        rec = _Record(job_id=job_id, name=spec.name, started_at=time.time(), output_path=spec.output_path,
                      time_limit_s=spec.time_limit_s)
        self._save(rec)
        try:
            with open(spec.output_path, "ab") as out:
                proc = subprocess.Popen(
                    [*self._prefix, "bash", "-c", _WRAPPER, "hpcgate-local-job", str(script), str(rc_file),
                     str(self._path(job_id, ".pid"))],
                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=spec.workdir,
                    start_new_session=True,
                )
        except OSError as exc:
            self._path(job_id, ".json").unlink(missing_ok=True)
            raise LauncherError(f"cannot start bash: {exc}") from None
        assert proc.stdin is not None
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
        rec.pid, rec.proc_start = proc.pid, _proc_start(proc.pid) or 0
        self._children[job_id] = proc
        self._save(rec)
        return job_id

    def _resolve_pid(self, rec: _Record, now: float) -> bool:
        """Fill in the pid of a job whose submitter died before recording it; False if the job
        never started (no pid file after a grace period)."""
        try:
            pid = int(self._path(rec.job_id, ".pid").read_text().strip())
        except (OSError, ValueError):
            return now - rec.started_at < 10.0
        rec.pid, rec.proc_start = pid, _proc_start(pid) or -1
        self._save(rec)
        return True

    def _signal(self, rec: _Record, sig: signal.Signals) -> None:
        if rec.pid <= 0 or _proc_start(rec.pid) != rec.proc_start:
            return  # gone, or the pid now belongs to another process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, sig)

    def _load(self, path: Path) -> _Record | None:
        try:
            return msgspec.json.decode(path.read_bytes(), type=_Record)
        except (OSError, msgspec.DecodeError):
            return None  # half-written by a crash: the .tmp never replaced it, or it was purged

    def _observe_one(self, rec: _Record, now: float) -> ObservedJob | None:
        if rec.pid == 0 and not self._resolve_pid(rec, now):
            if rec.ended_at is None:
                rec.ended_at = now  # never started: the submitter died before the process did
                self._save(rec)
        elif rec.pid == 0:
            return ObservedJob(launcher_job_id=rec.job_id, name=rec.name, state=JobState.PENDING,
                               node=self._node, time_limit_s=rec.time_limit_s, output_path=rec.output_path)
        child = self._children.get(rec.job_id)
        if child is not None and child.poll() is not None:
            del self._children[rec.job_id]
        rc_text = None
        with contextlib.suppress(OSError):
            rc_text = self._path(rec.job_id, ".rc").read_text().strip()
        # The wrapper may have died (SIGKILL) while the group lingers: check the group's leader.
        leader_alive = _proc_start(rec.pid) == rec.proc_start
        state = JobState.RUNNING
        outcome: Outcome | None = None
        exit_code: int | None = int(rc_text) if rc_text and rc_text.lstrip("-").isdigit() else None
        if rc_text is not None or not leader_alive:
            state = JobState.ENDED
            if rec.ended_at is None:
                rec.ended_at = now
                self._save(rec)
            if rec.timed_out:
                outcome = Outcome.TIMEOUT
            elif rec.cancel_requested_at is not None:
                outcome = Outcome.CANCELLED
            elif exit_code == 0:
                outcome = Outcome.COMPLETED
            else:
                outcome = Outcome.FAILED
            if leader_alive:
                self._signal(rec, signal.SIGKILL)  # leftovers of a finished script
            if now - rec.ended_at > self._keep_ended_s:
                for suffix in (".json", ".rc", ".sh", ".pid"):
                    self._path(rec.job_id, suffix).unlink(missing_ok=True)
                return None
        else:
            if rec.time_limit_s is not None and now - rec.started_at > rec.time_limit_s and not rec.timed_out:
                rec.timed_out = True
                rec.cancel_requested_at = rec.cancel_requested_at or now
                self._save(rec)
                self._signal(rec, signal.SIGTERM)
            if rec.cancel_requested_at is not None:
                state = JobState.ENDING
                if now - rec.cancel_requested_at >= self._kill_wait_s:
                    self._signal(rec, signal.SIGKILL)
        return ObservedJob(
            launcher_job_id=rec.job_id, name=rec.name, state=state, outcome=outcome,
            reason="TimeLimit" if rec.timed_out else None,
            exit_code=exit_code if state is JobState.ENDED else None,
            node=self._node, start_time=rec.started_at, time_limit_s=rec.time_limit_s,
            output_path=rec.output_path,
        )

    async def observe(self, name_prefix: str) -> list[ObservedJob]:
        return self._observe(name_prefix)

    def _observe(self, name_prefix: str) -> list[ObservedJob]:
        now = time.time()
        out = []
        for path in sorted(self._dir.glob("*.json")):
            rec = self._load(path)
            if rec is None or not rec.name.startswith(name_prefix):
                continue
            obs = self._observe_one(rec, now)
            if obs is not None:
                out.append(obs)
        return out

    async def cancel(self, launcher_job_id: str) -> None:
        self._cancel(launcher_job_id)

    def _cancel(self, launcher_job_id: str) -> None:
        rec = self._load(self._path(launcher_job_id, ".json")) if re.match(r"^local-[0-9a-f]+$",
                                                                          launcher_job_id) else None
        if rec is None:
            return
        if rec.cancel_requested_at is None:
            rec.cancel_requested_at = time.time()
            self._save(rec)
        self._signal(rec, signal.SIGTERM)

    async def read_output(self, job: ObservedJob, max_bytes: int = 4096) -> str | None:
        return self._read_output(job, max_bytes)

    def _read_output(self, job: ObservedJob, max_bytes: int) -> str | None:
        if not job.output_path:
            return None
        try:
            with open(job.output_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return None

    async def close(self) -> None:
        for child in self._children.values():
            child.poll()
        self._children.clear()
