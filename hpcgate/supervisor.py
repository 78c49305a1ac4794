"""Start child processes, wait for their readiness, stop them in reverse order.

Used by ``hpcgate up`` (and usable by harnesses) to run several hpcgate daemons on one machine.
Invariants: a child is "ready" only when its readiness check passes (a stdout line with a
known event, or an HTTP probe), never after a sleep; ``stop_all`` sends SIGTERM to every
child's process group in reverse start order, waits up to a grace period, then SIGKILLs, so
no child outlives the supervisor; each child writes its output to a log file of its own (read
here only until it is ready). Every
child is started with ``HPCGATE_PARENT_PID`` (:func:`hpcgate.lifecycle.die_with_parent`), so it
gets SIGTERM when the supervisor dies, even of SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from hpcgate.lifecycle import PARENT_PID_ENV

READY_POLL_S = 0.02  # how often a starting child's log is read for its readiness event


class ChildFailedError(Exception):
    """A child exited or did not become ready; the message says which and where its log is."""


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def hpcgate_argv(*args: str) -> list[str]:
    """The argv that runs ``hpcgate ARGS`` with this interpreter's installation."""
    return [sys.executable, "-m", "hpcgate", *args]


class Supervisor:
    def __init__(self, log_dir: Path, env: dict[str, str], *,
                 on_spawn: Callable[[Child], None] | None = None) -> None:
        self.log_dir = log_dir
        self.env = env
        self.on_spawn = on_spawn  # called once the child's process exists (``up`` records its pid)
        self.children: list[Child] = []

    async def start(self, name: str, argv: list[str], ready_event: str, timeout: float = 60.0) -> Child:
        """Start a child and wait until it logs the JSON event ``ready_event`` (stdout or stderr)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(name, argv, self.log_dir / f"{name}.log")
        # The child writes its log file itself (append mode), not through a pipe of ours: its last
        # lines reach the file even after this process died (a killed ``up``), when it stops.
        with child.log_path.open("ab") as log_file:
            offset = log_file.tell()
            child.proc = await asyncio.create_subprocess_exec(
                *argv,
                env={**self.env, PARENT_PID_ENV: str(os.getpid())},
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop_all reaches grandchildren
            )
        self.children.append(child)
        if self.on_spawn is not None:
            self.on_spawn(child)
        try:
            await asyncio.wait_for(_logged(child, ready_event, offset), timeout)
        except TimeoutError:
            msg = f"{child.name} not ready after {timeout:.0f}s; log {child.log_path}"
            raise ChildFailedError(msg) from None
        return child

    async def wait_any_exit(self) -> Child:
        """Return the first child that exits (the supervisor treats that as fatal)."""
        waits = {asyncio.ensure_future(c.proc.wait()): c for c in self.children if c.proc is not None}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for fut in pending:
            fut.cancel()
        return waits[next(iter(done))]

    async def stop(self, name: str, grace: float = 15.0) -> None:
        """Stop the children called ``name`` (SIGTERM to the group, SIGKILL after ``grace``)."""
        for child in self.children:
            if child.name == name and child.running and child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.proc.wait(), grace)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                    await child.proc.wait()

    async def stop_all(self, grace: float = 15.0) -> None:
        for child in reversed(self.children):
            if child.running and child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                await asyncio.wait_for(child.proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                await child.proc.wait()


async def _logged(child: Child, event: str, offset: int) -> None:
    """Return once the child's log, read from ``offset``, holds the JSON line of ``event``; raise
    :class:`ChildFailedError` if the child exits before."""
    assert child.proc is not None
    rest = b""
    with child.log_path.open("rb") as log:
        log.seek(offset)
        while True:
            exited = child.proc.returncode is not None  # before the read: its last lines are in
            *lines, rest = (rest + log.read()).split(b"\n")
            for line in lines:
                if line.startswith(b"{"):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        doc = orjson.loads(line)
                        if isinstance(doc, dict) and doc.get("event") == event:
                            return
            if exited:
                raise ChildFailedError(f"{child.name} exited with {child.proc.returncode} before it was "
                                       f"ready; log {child.log_path}:\n{child.tail()}")
            await asyncio.sleep(READY_POLL_S)
