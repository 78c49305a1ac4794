"""What one ``hpcgate up`` leaves behind, and how the next one finds and clears it.

- ``<data_dir>/run.json`` (:class:`RunRecord`): the pid of ``up`` and of every daemon it
  started, each with its start time (``/proc/<pid>/stat`` field 22), rewritten after each
  start. The next ``up`` ends the processes of that record that still live (their process
  groups: SIGTERM, then SIGKILL), and only those: a pid reused by another program has another
  start time and is left alone.
- :func:`port_holder` names the process listening on a port (from ``/proc/net/tcp*`` and the
  descriptors this user may read), so "in use" says by whom.
- :func:`rotate_logs` moves the previous run's logs to ``*.log.1``: a new run starts its own.

Pure helpers over ``/proc`` and files; no asyncio, no database (see :mod:`hpcgate.up_jobs`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import msgspec


class Proc(msgspec.Struct, frozen=True):
    name: str
    pid: int
    start: int  # clock ticks since boot; 0: unknown


class RunRecord(msgspec.Struct, frozen=True):
    up: Proc
    data_dir: str
    children: list[Proc] = msgspec.field(default_factory=list)


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def this_process(name: str = "up", pid: int | None = None) -> Proc:
    pid = os.getpid() if pid is None else pid
    return Proc(name, pid, proc_start(pid) or 0)


def alive(p: Proc) -> bool:
    """The very process of the record still runs (not a later one with a reused pid)."""
    return p.pid > 0 and p.start > 0 and proc_start(p.pid) == p.start


def read_record(path: Path) -> RunRecord | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=RunRecord)
    except (OSError, msgspec.DecodeError):
        return None


def write_record(path: Path, record: RunRecord) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(record))
    tmp.replace(path)


def end_processes(procs: list[Proc], grace_s: float = 5.0) -> list[Proc]:
    """SIGTERM the process groups of the live ``procs`` (a daemon then writes what it holds, e.g.
    a gateway's usage), SIGKILL what remains after ``grace_s``; returns the ones that were alive."""
    live = [p for p in procs if alive(p)]
    for p in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, signal.SIGTERM)
            else:
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in live:
        if alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
    return live


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(inode)
    return inodes


def listening_pid(port: int) -> int | None:
    """The pid of a process listening on ``port`` (0: one this user cannot see; None: none)."""
    wanted = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not wanted:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(entry.name)
    return 0


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of a process listening on ``port``, if this user can see it."""
    pid = listening_pid(port)
    if pid is None:
        return None
    return f"pid {pid} ({command_line(pid)[:200]})" if pid else "a process of another user"


def serves_data_dir(pid: int, data_dir: Path) -> bool:
    """The process was started for this data dir (``HPCGATE_DATA_DIR`` in its environment): a
    daemon of an earlier ``up`` here, e.g. one that predates ``run.json``."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"HPCGATE_DATA_DIR={data_dir}".encode() in environ


def rotate_logs(log_dir: Path) -> None:
    """Keep the previous run's logs as ``NAME.log.1`` (one generation), so this run's are its own."""
    if not log_dir.is_dir():
        return
    for log in log_dir.glob("*.log"):
        log.replace(log.with_name(log.name + ".1"))
