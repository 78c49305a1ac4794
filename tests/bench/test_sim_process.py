"""``hpcgate sim`` as a process: the port line, the OpenAI SDK against it, SIGTERM exit code."""

from __future__ import annotations

import asyncio
import socket
import time

import openai

from tests.support.procs import child_env, hpcgate_cmd
from tests.support.sim import sim_process


async def test_port_zero_prints_port_and_serves_sdk() -> None:
    started = time.monotonic()
    async with sim_process("--model", "m1", "--model", "m1-alias") as sim:
        assert sim.port > 0
        assert time.monotonic() - started < 5.0  # loose: "well under a second" on an idle machine
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="unused")
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m1", "m1-alias"]
        chat = await client.chat.completions.create(
            model="m1-alias", messages=[{"role": "user", "content": "one two three"}], max_tokens=5,
            extra_body={"ignore_eos": True})
        assert chat.usage is not None
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 5)
        assert chat.choices[0].finish_reason == "length"
        await client.close()
        proc = sim.proc
    assert proc.returncode == 0


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = await asyncio.create_subprocess_exec(
            *hpcgate_cmd("sim", "--port", str(taken.getsockname()[1])), env=child_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 1 and out == b""
    assert b"cannot listen on 127.0.0.1" in err and b"Traceback" not in err
