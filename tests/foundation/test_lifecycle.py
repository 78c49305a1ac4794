"""Process lifecycle helpers with real processes and signals: the stop-signal pair, the
parent-death signal, and what ``hpcgate up`` does with the state a killed run left."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcgate.lifecycle import PARENT_PID_ENV, install_stop_signals
from hpcgate.up_preflight import UpError, clear_stale
from hpcgate.up_state import (
    Proc,
    RunRecord,
    alive,
    end_processes,
    proc_start,
    rotate_logs,
    this_process,
    write_record,
)
from tests.support.procs import wait_until


async def test_first_stop_signal_stops_and_the_second_exits() -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    second: list[int] = []
    install_stop_signals(loop, stopped.set, second.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stopped.wait(), 5)
        assert not second
        os.kill(os.getpid(), signal.SIGINT)
        await wait_until(lambda: second == [signal.SIGINT], 5, "the second signal")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


CHILD = ("from hpcgate.lifecycle import die_with_parent; die_with_parent(); import os, time; "
         "print(os.getpid(), flush=True); time.sleep(60)")
# A parent that starts CHILD with its own pid in HPCGATE_PARENT_PID, relays its pid, then waits.
PARENT = ("import os, subprocess, sys, time; "
          "env = dict(os.environ, " + PARENT_PID_ENV + "=str(os.getpid())); "
          "c = subprocess.Popen([sys.executable, '-c', sys.argv[1]], env=env, stdout=subprocess.PIPE); "
          "print(c.stdout.readline().decode().strip(), flush=True); time.sleep(60)")


async def test_a_child_of_a_supervisor_killed_with_sigkill_gets_sigterm() -> None:
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", PARENT, CHILD,
                                                  stdout=asyncio.subprocess.PIPE)
    assert parent.stdout is not None
    child_pid = int(await asyncio.wait_for(parent.stdout.readline(), 20))
    child = this_process("child", child_pid)
    assert alive(child)
    parent.kill()
    await parent.wait()
    await wait_until(lambda: not alive(child), 10, "the child to end with its parent")


# A daemon that stops slowly: its first stop signal starts a one-second cleanup that it reports
# on stdout; a second stop signal would end it at once, without the report.
SLOW_STOPPER = ("from hpcgate.lifecycle import die_with_parent, install_stop_signals; die_with_parent(); "
                "import asyncio, os\n"
                "async def main():\n"
                "    stop = asyncio.Event()\n"
                "    install_stop_signals(asyncio.get_running_loop(), stop.set)\n"
                "    print(os.getpid(), flush=True)\n"
                "    await stop.wait()\n"
                "    await asyncio.sleep(1)\n"
                "    open(os.environ['REPORT'], 'w').write('cleaned up')\n"
                "asyncio.run(main())")
# PARENT with eight idle threads, as ``hpcgate up`` has executor threads: when it is killed, Linux
# moves the child to each of its threads in turn, and sends the parent-death signal at each move.
THREADED_PARENT = ("import threading, time; "
                   "[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() "
                   "for _ in range(8)]; " + PARENT)


async def test_the_death_signal_repeated_by_a_dying_threaded_parent_is_one_stop(tmp_path: Path) -> None:
    report = tmp_path / "report"
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", THREADED_PARENT, SLOW_STOPPER,
                                                  stdout=asyncio.subprocess.PIPE,
                                                  env={**os.environ, "REPORT": str(report)})
    assert parent.stdout is not None
    child = this_process("child", int(await asyncio.wait_for(parent.stdout.readline(), 20)))
    parent.kill()
    await parent.wait()
    await wait_until(lambda: not alive(child), 10, "the child to end with its parent")
    assert report.exists(), "the child was ended at once, as by a second stop signal, not stopped"


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    env = dict(os.environ, **{PARENT_PID_ENV: "1"})  # not our parent: it "died" before we looked
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 1 and "parent process 1 is gone" in done.stderr


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_end_processes_ends_recorded_processes_and_spares_a_reused_pid() -> None:
    ours, stranger = _sleeper(), _sleeper()
    try:
        start = proc_start(stranger.pid) or 0
        record = [this_process("gateway", ours.pid), Proc("api", stranger.pid, start + 1)]  # not that process
        assert end_processes(record, grace_s=5) == record[:1]
        assert ours.wait(5) == -signal.SIGTERM
        assert stranger.poll() is None
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait()


def test_clear_stale_ends_a_killed_runs_daemons_and_names_what_holds_a_port(tmp_path: Path) -> None:
    leftover = _sleeper()
    dead_up = subprocess.Popen(["true"])
    dead_up.wait()
    write_record(tmp_path / "run.json", RunRecord(up=Proc("up", dead_up.pid, 1), data_dir=str(tmp_path),
                                                  children=[this_process("gateway", leftover.pid)]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(UpError, match=rf"127\.0\.0\.1:{port} is in use by pid {os.getpid()} \(.*python"):
            clear_stale(tmp_path, [("127.0.0.1", port)])
    assert leftover.wait(5) == -signal.SIGTERM

    running = RunRecord(up=this_process("up", os.getppid()), data_dir=str(tmp_path))
    write_record(tmp_path / "run.json", running)
    with pytest.raises(UpError, match=rf"hpcgate up \(pid {os.getppid()}\) is running with data dir"):
        clear_stale(tmp_path, [])


def test_rotate_logs_keeps_one_previous_generation(tmp_path: Path) -> None:
    (tmp_path / "gateway.log").write_text("old run\n")
    rotate_logs(tmp_path)
    assert not (tmp_path / "gateway.log").exists()
    assert (tmp_path / "gateway.log.1").read_text() == "old run\n"
    rotate_logs(tmp_path / "missing")  # no logs yet: nothing to do


def test_clear_stale_ends_an_orphaned_daemon_of_this_data_dir_that_holds_a_port(tmp_path: Path) -> None:
    """A daemon of an earlier up here (no run.json: e.g. an older version's) is recognised by its
    HPCGATE_DATA_DIR and ended; the port is then free."""
    listen = ("import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
              "print(s.getsockname()[1], flush=True); time.sleep(60)")
    orphan = subprocess.Popen([sys.executable, "-c", listen], stdout=subprocess.PIPE, start_new_session=True,
                              env=dict(os.environ, HPCGATE_DATA_DIR=str(tmp_path)))
    try:
        assert orphan.stdout is not None
        port = int(orphan.stdout.readline())
        clear_stale(tmp_path, [("127.0.0.1", port)])
        assert orphan.wait(5) == -signal.SIGTERM
    finally:
        orphan.kill()
        orphan.wait()
