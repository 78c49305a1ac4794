"""``hpcgate up``: the whole stack on one machine answers an OpenAI client, then stops cleanly."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from pathlib import Path

import asyncpg
import openai

from tests.support.procs import child_env, hpcgate_cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _read_until(stream: asyncio.StreamReader, pattern: re.Pattern[str], seen: list[str],
                      timeout: float) -> re.Match[str]:
    async def scan() -> re.Match[str]:
        while line := (await stream.readline()).decode():
            seen.append(line)
            if match := pattern.search(line):
                return match
        raise AssertionError("hpcgate up exited early:\n" + "".join(seen))

    return await asyncio.wait_for(scan(), timeout)


async def test_up_serves_openai_then_stops(pg_dsn: str, redis_prefix: str, tmp_path: Path) -> None:
    gateway_port, api_port = _free_port(), _free_port()
    env = child_env(
        HPCGATE_DATABASE_URL=pg_dsn, HPCGATE_REDIS_PREFIX=f"{redis_prefix}up:",
        HPCGATE_DATA_DIR=str(tmp_path), HPCGATE_UP_MODEL="up-demo", HPCGATE_UP_TENANT="up-demo",
    )
    proc = await asyncio.create_subprocess_exec(
        *hpcgate_cmd("up", "--gateway-port", str(gateway_port), "--api-port", str(api_port),
                     "--instances", "2"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        url = (await _read_until(proc.stdout, re.compile(r"gateway URL : (\S+)"), seen, 90)).group(1)
        key = (await _read_until(proc.stdout, re.compile(r"API key     : (hpg_\S+)"), seen, 5)).group(1)
        assert url == f"http://127.0.0.1:{gateway_port}/v1"

        client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        stream = await client.chat.completions.create(
            model="up-demo", messages=[{"role": "user", "content": "hello"}], stream=True, max_tokens=8,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text
        models = await client.models.list()
        assert "up-demo" in [m.id for m in models.data]
        await client.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stdout.read(), 60)
        await proc.wait()
    assert proc.returncode == 0, "".join(seen) + rest.decode()

    # Ctrl-C scaled the demo model to zero: none of its jobs is left running.
    conn = await asyncpg.connect(pg_dsn)
    try:
        states = await conn.fetch(
            """SELECT j.state FROM ai_model_endpoint_jobs j JOIN ai_model_configurations m USING (model_id)
               WHERE m.name = 'up-demo'""")
    finally:
        await conn.close()
    assert len(states) >= 2
    assert {r["state"] for r in states} <= {"ended", "failed"}, states
