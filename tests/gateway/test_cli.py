"""``hpcgate gateway`` as a process: several workers on one port, graceful SIGTERM, a dead worker
replaced."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai

from tests.gateway.conftest import post, raw_exchange
from tests.support.procs import child_env, hpcgate_cmd, wait_until
from tests.support.sim import sim_process


class GatewayProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.log = ""  # its stderr, filled in when the process has been stopped


@asynccontextmanager
async def two_workers(upstream: str) -> AsyncIterator[GatewayProcess]:
    """``hpcgate gateway --workers 2`` in front of ``upstream``; SIGTERM (then SIGKILL) on exit."""
    with tempfile.TemporaryFile() as err:
        proc = await asyncio.create_subprocess_exec(
            *hpcgate_cmd("gateway", "--port", "0", "--workers", "2", "--no-auth",
                         "--static-endpoint", f"m1={upstream}"),
            stdout=asyncio.subprocess.PIPE, stderr=err, env=child_env(),
        )
        gw: GatewayProcess | None = None
        try:
            assert proc.stdout is not None
            event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            assert event["event"] == "gateway_listening" and event["port"] > 0
            gw = GatewayProcess(proc, event["port"])
            yield gw
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            err.seek(0)
            if gw is not None:
                gw.log = err.read().decode()


async def test_workers_share_a_port_and_sigterm_finishes_streams_in_flight() -> None:
    async with sim_process("--model", "m1", "--profile", "gpu-s") as sim:
        async with two_workers(sim.url) as gw:
            # both workers answer on the one port (each /metrics is per worker, labelled)
            workers = set()
            for _ in range(40):
                reply = await raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
                workers |= {w for w in ("0", "1") if f'worker="{w}"'.encode() in reply.body}
                if len(workers) == 2:
                    break
            assert workers == {"0", "1"}
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
            try:
                stream = await client.chat.completions.create(
                    model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=30, stream=True,
                    extra_body={"ignore_eos": True})
                first = await stream.__anext__()
                gw.proc.send_signal(signal.SIGTERM)  # graceful: the stream in flight must finish
                rest = [c async for c in stream]
                tokens = [c for c in [first, *rest] if c.choices and c.choices[0].delta.content]
                assert len(tokens) == 30
            finally:
                await client.close()
            assert await asyncio.wait_for(gw.proc.wait(), 30) == 0
            try:
                await raw_exchange(gw.port, post("/v1/chat/completions", b"{}"), timeout=2)
                raise AssertionError("the gateway still accepts connections after SIGTERM")
            except OSError:
                pass
        assert "worker_stopped" in gw.log, gw.log


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(x) for x in f.read().split()}


async def test_a_worker_that_dies_is_replaced_and_the_port_keeps_serving() -> None:
    async with sim_process("--model", "m1") as sim:
        async with two_workers(sim.url) as gw:
            before = _children(gw.proc.pid)
            assert len(before) == 2
            victim = min(before)
            os.kill(victim, signal.SIGKILL)  # a crash: no graceful anything
            await wait_until(lambda: len(_children(gw.proc.pid) - {victim}) == 2, 20,
                             "the parent to start a replacement worker")
            body = b'{"model":"m1","messages":[{"role":"user","content":"x"}],"max_tokens":2}'
            for _ in range(10):  # new connections land on either worker: all are answered
                reply = await raw_exchange(gw.port, post("/v1/chat/completions", body))
                assert reply.status == 200, reply
        assert '"event":"worker_died"' in gw.log.replace(" ", ""), gw.log


async def test_workers_exit_when_the_parent_is_killed() -> None:
    """SIGKILL to the parent alone: its workers get SIGTERM from the kernel, drain and exit, so
    nothing serves on the port unsupervised (a new gateway there would share it with them)."""
    async with sim_process("--model", "m1") as sim:
        async with two_workers(sim.url) as gw:
            workers = _children(gw.proc.pid)
            assert len(workers) == 2
            gw.proc.kill()
            await gw.proc.wait()

            def gone() -> bool:
                return not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers)

            await wait_until(gone, 20, "the workers to exit after their parent's SIGKILL")
            try:
                await raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\n\r\n", timeout=2)
                raise AssertionError("a worker still serves on the port after its parent died")
            except OSError:
                pass
        assert "worker_stopped" in gw.log, gw.log


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_worker_that_keeps_dying_at_start_is_restarted_ever_more_slowly() -> None:
    from gateway.main import restart_delay

    assert [restart_delay(n) for n in range(6)] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50) == 30.0


async def test_a_port_another_process_serves_is_refused_not_shared() -> None:
    """SO_REUSEPORT would let a second gateway (or one started on the control API's port) share
    the port silently, taking part of its connections: it refuses to start instead."""
    async with sim_process("--model", "m1") as sim, two_workers(sim.url) as gw:
        for workers in ("1", "2"):
            proc = await asyncio.create_subprocess_exec(
                *hpcgate_cmd("gateway", "--port", str(gw.port), "--workers", workers, "--no-auth",
                             "--static-endpoint", f"m1={sim.url}"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env(),
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 1, (out, err)
            assert f"127.0.0.1:{gw.port} is in use" in err.decode()
        reply = await raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert reply.status == 200  # the first gateway still serves its port alone
