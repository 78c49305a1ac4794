"""Usage a gateway worker counted survives the worker's SIGKILL (an OOM kill).

Found by ``hpcgate bench chaos``: a SIGKILLed worker took the usage it had not flushed yet with
it. Now each worker spools its counts in memory its parent shares (``gateway/usage_spool.py``)
and the worker the parent starts in its place writes what was left. The flush interval here is
an hour, so nothing is written before the kills: without the spool PostgreSQL would hold none of
these requests.
"""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack

import psutil  # type: ignore[import-untyped]

from bench.procs import start_dynamic_gateway, stop
from tests.control.conftest import Stack
from tests.control.daemons import Daemon, chat, start_health
from tests.control.test_two_gateways import new_key, serve_model
from tests.support.procs import wait_until

MODEL = "spool/model"


async def test_usage_of_killed_workers_is_written_by_their_successors(stack: Stack, api: Daemon) -> None:
    async with AsyncExitStack() as exits:
        health = await start_health(stack.env, stack.tmp)
        exits.push_async_callback(health.stop)
        await serve_model(stack, exits, MODEL)
        key, _ = await new_key(stack, "spool")
        env = {**stack.env, "HPCGATE_LOG_LEVEL": "info", "HPCGATE_GATEWAY_ACCESS_LOG": "false",
               "HPCGATE_GATEWAY_USAGE_FLUSH_S": "3600"}
        gateway = await start_dynamic_gateway(env, workers=2)
        exits.push_async_callback(stop, gateway)
        answered = 0

        async def served() -> bool:
            nonlocal answered
            statuses = [await chat(gateway.port, key, MODEL) for _ in range(8)]
            answered += statuses.count(200)
            return statuses == [200] * 8

        await wait_until(served, 15, "both workers to serve the model")
        for _ in range(30):
            assert await chat(gateway.port, key, MODEL) == 200
            answered += 1

        for victim in psutil.Process(gateway.proc.pid).children():  # both workers, one at a time
            victim.send_signal(signal.SIGKILL)

            def replaced(pid: int = victim.pid) -> bool:
                workers = psutil.Process(gateway.proc.pid).children()
                return len(workers) == 2 and pid not in [w.pid for w in workers]

            await wait_until(replaced, 10, "the parent to restart the worker")

        async def written() -> bool:
            rows = await stack.sql(
                # a worker that had no instance yet answered 503, booked as a failed request
                """SELECT coalesce(sum(u.requests - u.errors), 0) AS n FROM usage_records u
                   JOIN identity_tenants t USING (tenant_id) WHERE t.name = 'spool'""")
            got[:] = [int(rows[0]["n"])]
            return got[0] == answered  # every answered request, once

        got: list[int] = []
        try:
            await wait_until(written, 10, f"{answered} requests in usage_records")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; PostgreSQL holds {got}") from None
        assert '"event":"usage_taken_over"' in gateway.stderr_text()
