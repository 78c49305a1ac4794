"""Start ``hpcgate`` subprocesses and wait on readiness probes, never on sleeps."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

HPCGATE = str(Path(sys.executable).with_name("hpcgate"))


def hpcgate_cmd(*args: str) -> list[str]:
    return [HPCGATE, *args]


def child_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without stray HPCGATE_* settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")}
    env.update(overrides)
    return env


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a cheap predicate (sync or async) until it is truthy; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def tcp_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    return True
