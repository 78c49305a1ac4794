"""Every daemon, as a real process: SIGTERM finishes the work in flight and exits 0; a second
SIGTERM or SIGINT while it is still finishing exits at once (128 + the signal's number). Two
different signals sent together may be delivered in either order (the kernel hands out the lower
number first), so the code of either is accepted; the same signal twice is sent only once the
first was seen, since a pending signal is not queued twice."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import openai

from tests.control.conftest import Stack
from tests.control.daemons import ADMIN_TOKEN, Daemon, start_api, start_daemon
from tests.support.procs import child_env, hpcgate_cmd, wait_until
from tests.support.sim import SimProcess, sim_process

TOKENS = 60  # at the paced profile's 20 ms a step: a stream of about 1.2 s


SECOND = {128 + signal.SIGTERM, 128 + signal.SIGINT}


@asynccontextmanager
async def gateway_in_front_of(upstream: str, log: Path
                              ) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *hpcgate_cmd("gateway", "--port", "0", "--no-auth", "--static-endpoint", f"m1={upstream}"),
            stdout=asyncio.subprocess.PIPE, stderr=err, env=child_env())
        try:
            assert proc.stdout is not None
            event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            assert event["event"] == "gateway_listening"
            yield proc, int(event["port"])
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _stream_with_signals(base_url: str, proc: asyncio.subprocess.Process,
                               signals: list[signal.Signals], between: Path | None = None) -> int:
    """Start a long stream, send ``signals`` to ``proc`` after its first token (with ``between``,
    the second only once that log says it is stopping); return the content tokens received."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    got = 0
    try:
        stream = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "x"}], max_tokens=TOKENS, stream=True,
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 1:
                    for i, sig in enumerate(signals):
                        if i and between is not None:
                            await wait_until(lambda: b"worker_stopping" in between.read_bytes(), 10,
                                             "the first signal to be seen")
                        proc.send_signal(sig)
    except openai.APIError:
        pass  # cut: counted by the caller
    finally:
        await client.close()
    return got


async def test_sim_finishes_streams_on_sigterm_and_exits_at_once_on_a_second_signal() -> None:
    async with sim_process("--model", "m1", "--profile", "paced") as sim:
        assert await _stream_with_signals(sim.base_url, sim.proc, [signal.SIGTERM]) == TOKENS
        assert await asyncio.wait_for(sim.proc.wait(), 10) == 0
    async with sim_process("--model", "m1", "--profile", "paced") as sim:
        got = await _stream_with_signals(sim.base_url, sim.proc, [signal.SIGTERM, signal.SIGINT])
        assert await asyncio.wait_for(sim.proc.wait(), 10) in SECOND
        assert got < TOKENS


async def test_gateway_finishes_streams_on_sigterm_and_exits_at_once_on_a_second_signal(tmp_path: Path
                                                                                          ) -> None:
    log = tmp_path / "gateway.log"
    async with sim_process("--model", "m1", "--profile", "paced") as sim:
        async with gateway_in_front_of(sim.url, log) as (gw, port):
            url = f"http://127.0.0.1:{port}/v1"
            assert await _stream_with_signals(url, gw, [signal.SIGTERM]) == TOKENS
            assert await asyncio.wait_for(gw.wait(), 10) == 0
        await _idle(sim)
        async with gateway_in_front_of(sim.url, log) as (gw, port):
            url = f"http://127.0.0.1:{port}/v1"
            got = await _stream_with_signals(url, gw, [signal.SIGTERM, signal.SIGTERM], log)
            assert await asyncio.wait_for(gw.wait(), 10) == 128 + signal.SIGTERM
            assert got < TOKENS


async def _idle(sim: SimProcess) -> None:
    """Nothing left running in the simulator (its /metrics gauge), before the next case."""
    async def idle() -> bool:
        reader, writer = await asyncio.open_connection(sim.host, sim.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        return any(line.startswith("vllm:num_requests_running") and line.endswith(" 0.0")
                   for line in body.splitlines())
    await wait_until(idle, 10, "the simulator to be idle")


async def _half_sent_request(port: int, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose head and the start of its body are in: the api is busy with it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /admin/tenants HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    await writer.drain()
    await wait_until(lambda: _established(port), 10, "the api to hold the connection")
    return reader, writer


async def test_control_api_answers_a_request_in_flight_on_sigterm(stack: Stack) -> None:
    """The request's body is still coming when SIGTERM arrives: it is answered, then exit 0.
    With a second signal meanwhile the api exits at once; with neither, at its deadline."""
    api = await start_api(stack.env, stack.tmp)
    body = b'{"name": "stop-signal-tenant"}'
    reader, writer = await _half_sent_request(api.port or 0, body)
    api.proc.send_signal(signal.SIGTERM)
    writer.write(body[5:])
    reply = await asyncio.wait_for(reader.read(), 10)
    assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
    writer.close()
    assert await asyncio.wait_for(api.proc.wait(), 10) == 0

    api = await start_api(stack.env, stack.tmp)
    reader, writer = await _half_sent_request(api.port or 0, b'{"name": "never-created"}')
    api.proc.send_signal(signal.SIGTERM)
    api.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(api.proc.wait(), 10) in SECOND
    writer.close()

    # A client that never finishes its request holds the stop only up to shutdown_timeout_s.
    api = await start_api({**stack.env, "HPCGATE_API_SHUTDOWN_TIMEOUT_S": "0.5"}, stack.tmp)
    reader, writer = await _half_sent_request(api.port or 0, b'{"name": "never-created"}')
    api.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(api.proc.wait(), 10) == 0
    assert api.events("api_stop_deadline")
    writer.close()


def _established(port: int) -> bool:
    """A connection to ``port`` on this machine is established (the server accepted it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


@asynccontextmanager
async def silent_database() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A "PostgreSQL" that accepts connections and never answers: a daemon connecting to it is
    busy (until its connect timeout) when the test signals it. Yields its DSN and an event set
    at the first connection."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/none", connected
    finally:
        for w in held:
            w.close()
        server.close()


async def _worker(stack: Stack, which: str, dsn: str | None = None) -> Daemon:
    env = {**stack.env, **({"HPCGATE_DATABASE_URL": dsn} if dsn else {}),
           "HPCGATE_DATA_DIR": str(stack.tmp / which)}
    return await start_daemon(["control", which], env, stack.tmp)


async def test_health_and_jobs_workers_stop_on_sigterm_and_at_once_on_a_second_signal(stack: Stack) -> None:
    for which, started in (("health", "health_worker_started"), ("jobs", "jobs_worker_started")):
        worker = await _worker(stack, which)
        await wait_until(_logged(worker, started), 20, f"{which} worker start")
        assert await worker.stop(signal.SIGTERM) == 0, worker.log_path.read_text()
        assert any(e.get("new") == "stopped" for e in worker.events("singleton_state")), which

        async with silent_database() as (dsn, connected):
            worker = await _worker(stack, which, dsn)
            await asyncio.wait_for(connected.wait(), 20)  # busy: its connect waits on a silent server
            worker.proc.send_signal(signal.SIGTERM)
            worker.proc.send_signal(signal.SIGINT)
            # A graceful stop would wait out the connect timeout and exit 0.
            assert await asyncio.wait_for(worker.proc.wait(), 10) in SECOND, which


def _logged(daemon: Daemon, event: str) -> Callable[[], bool]:
    def check() -> bool:
        if daemon.proc.returncode is not None:
            raise AssertionError(daemon.log_path.read_text())
        return bool(daemon.events(event))
    return check
