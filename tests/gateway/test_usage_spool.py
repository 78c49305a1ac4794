"""The usage spool a gateway worker shares with its parent: records survive the worker, a
record is seen only once complete, a committed batch is not seen again, a full spool refuses."""

from __future__ import annotations

import os
import signal

from gateway.usage import UsageRecorder
from gateway.usage_spool import UsageSpool


def test_records_past_flushed_are_the_unwritten_ones() -> None:
    spool = UsageSpool(capacity=4)
    spool.append(7, "m/a", 60, ok=True, prompt=3, completion=5)
    spool.append(8, "m/b", 120, ok=False, prompt=1, completion=0)
    assert list(spool.unwritten()) == [(7, "m/a", 60, True, 3, 5), (8, "m/b", 120, False, 1, 0)]
    spool.mark_flushed(1)
    assert list(spool.unwritten()) == [(8, "m/b", 120, False, 1, 0)]
    for i in range(3):  # the ring wraps: 3 more fill it to capacity with one unwritten
        spool.append(9, "m/c", 180, ok=True, prompt=i, completion=i)
    spool.append(9, "m/c", 180, ok=True, prompt=99, completion=99)  # full: refused, counted
    assert spool.overflowed == 1 and spool.written == 5
    assert [r[4] for r in spool.unwritten()] == [1, 0, 1, 2]
    spool.mark_flushed(spool.written)
    assert list(spool.unwritten()) == []
    spool.append(1, "x" * 129, 0, ok=True, prompt=1, completion=1)  # longer than any model name
    assert spool.overflowed == 2


def test_what_a_killed_child_spooled_is_read_by_the_parent() -> None:
    spool = UsageSpool()
    pid = os.fork()
    if pid == 0:  # the worker: counts two requests, then is SIGKILLed before it writes them
        spool.append(3, "m", 60, ok=True, prompt=10, completion=20)
        spool.append(3, "m", 60, ok=True, prompt=1, completion=2)
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert list(spool.unwritten()) == [(3, "m", 60, True, 10, 20), (3, "m", 60, True, 1, 2)]


def test_a_successor_counts_what_its_predecessor_left_and_spools_its_own() -> None:
    spool = UsageSpool()
    spool.append(3, "m", 60, ok=True, prompt=10, completion=20)
    spool.append(3, "m", 60, ok=False, prompt=1, completion=0)
    recorder = UsageRecorder("postgresql://unused", 60.0)
    assert recorder.attach(spool) == 2
    assert recorder.pending == 1  # one row: tenant 3, model m, minute 60
    recorder.add(3, "m", 61.0, ok=True, prompt=2, completion=2)
    assert recorder._rows == {(3, "m", 60): [3, 1, 13, 22]}  # the counts themselves
    assert spool.written == 3  # its own request is spooled too, the taken-over ones are not again
    assert UsageRecorder(None, 60.0).attach(spool) == 0  # no database: nothing to take over
