"""The supervisor behind ``hpcgate up``, with real child processes: a child is ready when its
log shows the readiness event, one that exits first fails with its exit status and the last
lines of its log, one that stays silent fails after the timeout, and each child writes its own
log file, which keeps what it writes after the supervisor stopped reading."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from hpcgate.supervisor import ChildFailedError, Supervisor

READY = 'print("starting", flush=True); print(\'{"event": "child_ready"}\', flush=True)'


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_ready_on_the_event_then_the_child_keeps_writing_its_own_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs", {})
    late = tmp_path / "late"
    code = (READY + "; import time, pathlib\n"
            f"while not pathlib.Path({str(late)!r}).exists(): time.sleep(0.01)\n"
            "print('after ready', flush=True)")
    child = await sup.start("worker", _py(code), "child_ready", timeout=20)
    assert child.running and "starting" in child.log_path.read_text()
    late.touch()
    assert child.proc is not None and await asyncio.wait_for(child.proc.wait(), 20) == 0
    assert child.log_path.read_text().endswith("after ready\n")  # written by the child itself
    await sup.stop_all(grace=5)


async def test_a_child_that_exits_before_it_is_ready_fails_with_its_status_and_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs", {})
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "api.log").write_text('{"event": "child_ready"}\n')  # an earlier run's line
    failed = r"(?s)api exited with 3 before it was ready; log .*api\.log:\n.*bad port"
    with pytest.raises(ChildFailedError, match=failed):
        await sup.start("api", _py("import sys; print('bad port', flush=True); sys.exit(3)"), "child_ready",
                        timeout=20)


async def test_a_child_that_never_says_it_is_ready_fails_after_the_timeout(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs", {})
    with pytest.raises(ChildFailedError, match=r"slow not ready after 1s; log .*slow\.log"):
        await sup.start("slow", _py("import time; time.sleep(30)"), "child_ready", timeout=1)
    await sup.stop_all(grace=5)
