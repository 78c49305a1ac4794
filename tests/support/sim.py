"""Start ``hpcgate sim`` as a subprocess for integration tests.

    async with sim_process("--model", "m1", "--max-num-seqs", "4") as sim:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="x")

The helper runs ``hpcgate sim --port 0 ARGS...``, waits for the one stdout line
``{"event":"sim_listening",...}`` (the readiness signal; no sleeps), and on exit sends SIGTERM,
waits, and kills only if it did not stop. The simulator's stderr (JSON logs) goes to a temp
file whose text is included in the error if startup fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tests.support.procs import child_env, hpcgate_cmd


@dataclass(frozen=True)
class SimProcess:
    host: str
    port: int
    proc: asyncio.subprocess.Process

    @property
    def url(self) -> str:
        """``http://host:port`` (for /health, /metrics, or a gateway's --static-endpoint)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://host:port/v1`` (for the OpenAI SDK)."""
        return f"{self.url}/v1"


@contextlib.asynccontextmanager
async def sim_process(*args: str, timeout: float = 15.0, **env: str) -> AsyncIterator[SimProcess]:
    """A running simulator; ``args`` are extra ``hpcgate sim`` flags, ``env`` extra variables."""
    with tempfile.TemporaryFile() as errfile:
        proc = await asyncio.create_subprocess_exec(
            *hpcgate_cmd("sim", "--port", "0", *args),
            stdout=asyncio.subprocess.PIPE, stderr=errfile, env=child_env(**env),
        )
        try:
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            except TimeoutError:
                line = b""
            if not line:
                errfile.seek(0)
                raise AssertionError(f"hpcgate sim did not start: {errfile.read().decode(errors='replace')}")
            event = json.loads(line)
            assert event["event"] == "sim_listening", event
            yield SimProcess(event["host"], int(event["port"]), proc)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
