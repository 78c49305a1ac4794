"""``hpcgate gateway`` as a process: several workers on one port, graceful SIGTERM, a dead worker
replaced."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile

import openai

from tests.gateway.conftest import post, raw_exchange
from tests.support.procs import child_env, hpcgate_cmd, wait_until
from tests.support.sim import sim_process


async def test_workers_share_a_port_and_sigterm_finishes_streams_in_flight() -> None:
    async with sim_process("--model", "m1", "--profile", "gpu-s") as sim:
        with tempfile.TemporaryFile() as err:
            proc = await asyncio.create_subprocess_exec(
                *hpcgate_cmd("gateway", "--port", "0", "--workers", "2", "--no-auth",
                             "--static-endpoint", f"m1={sim.url}"),
                stdout=asyncio.subprocess.PIPE, stderr=err, env=child_env(),
            )
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                event = json.loads(line)
                assert event["event"] == "gateway_listening" and event["port"] > 0
                port = event["port"]
                # both workers answer on the one port (each /metrics is per worker, labelled)
                workers = set()
                for _ in range(40):
                    reply = await raw_exchange(port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
                    text = reply.body
                    workers |= {w for w in ("0", "1") if f'worker="{w}"'.encode() in text}
                    if len(workers) == 2:
                        break
                assert workers == {"0", "1"}
                client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                            max_retries=0)
                try:
                    stream = await client.chat.completions.create(
                        model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=30, stream=True,
                        extra_body={"ignore_eos": True})
                    first = await stream.__anext__()
                    proc.send_signal(signal.SIGTERM)  # graceful: the stream in flight must finish
                    rest = [c async for c in stream]
                    tokens = [c for c in [first, *rest] if c.choices and c.choices[0].delta.content]
                    assert len(tokens) == 30
                finally:
                    await client.close()
                assert await asyncio.wait_for(proc.wait(), 30) == 0
                try:
                    await raw_exchange(port, post("/v1/chat/completions", b"{}"), timeout=2)
                    raise AssertionError("the gateway still accepts connections after SIGTERM")
                except OSError:
                    pass
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                err.seek(0)
                log = err.read().decode()
            assert "worker_stopped" in log, log


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(x) for x in f.read().split()}


async def test_a_worker_that_dies_is_replaced_and_the_port_keeps_serving() -> None:
    async with sim_process("--model", "m1") as sim:
        with tempfile.TemporaryFile() as err:
            proc = await asyncio.create_subprocess_exec(
                *hpcgate_cmd("gateway", "--port", "0", "--workers", "2", "--no-auth",
                             "--static-endpoint", f"m1={sim.url}"),
                stdout=asyncio.subprocess.PIPE, stderr=err, env=child_env(),
            )
            try:
                assert proc.stdout is not None
                port = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))["port"]
                before = _children(proc.pid)
                assert len(before) == 2
                victim = min(before)
                os.kill(victim, signal.SIGKILL)  # a crash: no graceful anything
                await wait_until(lambda: len(_children(proc.pid) - {victim}) == 2, 20,
                                 "the parent to start a replacement worker")
                body = b'{"model":"m1","messages":[{"role":"user","content":"x"}],"max_tokens":2}'
                for _ in range(10):  # new connections land on either worker: all are answered
                    reply = await raw_exchange(port, post("/v1/chat/completions", body))
                    assert reply.status == 200, reply
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), 30)
                err.seek(0)
                log = err.read().decode()
            assert '"event":"worker_died"' in log.replace(" ", ""), log
