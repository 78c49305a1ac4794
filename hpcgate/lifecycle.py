"""Process lifecycle helpers shared by every daemon: stop signals and dying with a supervisor.

Invariants:

- :func:`install_stop_signals`: the first SIGTERM or SIGINT calls ``on_stop`` once (the daemon
  then finishes work in flight up to its own deadline and exits 0); a second one ends the
  process at once (exit status 128 + the signal's number), whatever is still running.
- :func:`die_with_parent`: a process started by a supervisor (``hpcgate up``) with
  ``HPCGATE_PARENT_PID`` in its environment asks Linux for SIGTERM when that parent dies
  (``prctl(PR_SET_PDEATHSIG)``), so no daemon outlives a supervisor killed with SIGKILL. The
  variable is removed from the environment at once: grandchildren (a local instance started by
  the Job Worker) have other parents and must not match it. Linux sends that signal each time
  the child is moved to another thread of the dying parent, so a dying ``up`` with executor
  threads sends it several times: once the parent has died, a repeated SIGTERM is not a second
  stop signal (the first one's orderly stop goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

PARENT_PID_ENV = "HPCGATE_PARENT_PID"
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# (this process, its parent whose death sends it SIGTERM), once die_with_parent has asked for it
_death_signal_from: tuple[int, int] | None = None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies; False where
    the platform has no such thing (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """Honour ``HPCGATE_PARENT_PID`` (see module docstring). If that parent is already gone
    (it died between fork and now), exit at once: the death signal would never come."""
    global _death_signal_from
    value = os.environ.pop(PARENT_PID_ENV, None)
    if not value or not value.isdigit():
        return
    _death_signal_from = (os.getpid(), int(value))
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(value):
        print(f"hpcgate: parent process {value} is gone; exiting", file=sys.stderr, flush=True)
        raise SystemExit(1)


def parent_has_died(parent_pid: int) -> bool:
    """Whether ``parent_pid``, the process that started this one, has died or is dying.

    ``getppid()`` alone is not enough: Linux sends the parent-death signal as soon as the thread
    that forked this process exits, and while the parent's other threads are still being torn
    down (a SIGKILLed ``hpcgate up`` with its executor threads) this process is still its child;
    the parent's main thread is then a zombie."""
    if os.getppid() != parent_pid:
        return True
    try:
        stat = Path(f"/proc/{parent_pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def is_repeated_death_signal(signum: int) -> bool:
    """Whether ``signum``, received after a first stop signal, is the parent-death signal again
    (see the module docstring) rather than someone asking a second time. A process forked from
    this one (a gateway worker) has a parent of its own: never for it."""
    if signum != signal.SIGTERM or _death_signal_from is None:
        return False
    pid, parent = _death_signal_from
    return pid == os.getpid() and parent_has_died(parent)


def exit_at_once(status: int) -> NoReturn:
    """End the process with ``status`` now: no cleanup, only the output flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def exit_now(signum: int) -> None:
    """The second stop signal: exit at once with status 128 + its number."""
    exit_at_once(128 + signum)


def install_stop_signals(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], object],
                         on_second: Callable[[int], None] = exit_now) -> None:
    """SIGTERM/SIGINT: the first calls ``on_stop``, the second ``on_second`` (exit at once)."""
    received: list[int] = []

    def handler(signum: int) -> None:
        if received and is_repeated_death_signal(signum):
            return  # the dying parent's threads exit one by one, each sending it again
        received.append(signum)
        if len(received) == 1:
            on_stop()
        else:
            on_second(signum)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handler, int(sig))
