"""Helpers of the control-plane tests: start the daemons as real subprocesses, talk HTTP.

Daemons run as ``hpcgate control api|health`` with the environment a test gives; their stderr
(JSON logs) goes to a file the test can read (``Daemon.log_events()``). Readiness is a probe
(``GET /health`` for the api, the ``health_worker_started`` event for the worker), never a
sleep. HTTP calls use a tiny asyncio client so they never block the loop that runs the
:class:`tests.support.tcp_proxy.TcpProxy` instances of the outage tests.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import child_env, hpcgate_cmd, wait_until

ADMIN_TOKEN = "test-admin-token"
KEY_SECRET = "test-key-hash-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    log_path: Path
    port: int | None = None
    argv: list[str] = field(default_factory=list)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode or 0

    async def kill9(self) -> None:
        await self.stop(signal.SIGKILL)


async def start_daemon(args: list[str], env: dict[str, str], tmp: Path, port: int | None = None) -> Daemon:
    log_path = Path(tempfile.mkstemp(prefix="daemon-", suffix=".log", dir=tmp)[1])
    with log_path.open("wb") as fh:  # noqa: ASYNC230 - opening a local log file does not block
        proc = await asyncio.create_subprocess_exec(
            *hpcgate_cmd(*args), stdout=fh, stderr=fh, env=child_env(**env), start_new_session=True
        )
    return Daemon(proc, log_path, port, args)


async def start_api(env: dict[str, str], tmp: Path, port: int | None = None) -> Daemon:
    port = port or free_port()
    daemon = await start_daemon(["control", "api", "--port", str(port)], env, tmp, port)

    async def up() -> bool:
        if daemon.proc.returncode is not None:
            raise AssertionError(f"api exited: {daemon.log_path.read_text()}")
        try:
            status, _ = await http("GET", f"http://127.0.0.1:{port}/health", timeout=2)
        except OSError:
            return False
        return status == 200

    await wait_until(up, 20, "control api /health")
    return daemon


async def start_health(env: dict[str, str], tmp: Path, *, standby: bool = False) -> Daemon:
    """A running Endpoint Worker; with ``standby``, one that found the lock held and waits."""
    daemon = await start_daemon(["control", "health"], env, tmp)

    def started() -> bool:
        if daemon.proc.returncode is not None:
            raise AssertionError(f"health worker exited: {daemon.log_path.read_text()}")
        if standby:
            return any(e["new"] == "standby" for e in daemon.events("singleton_state"))
        return bool(daemon.events("health_worker_started"))

    await wait_until(started, 20, "health worker standby" if standby else "health worker start")
    return daemon


async def http(
    method: str, url: str, body: object = None, token: str | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """One HTTP/1.1 request; returns (status, decoded JSON body or None)."""
    assert url.startswith("http://")
    hostport, _, path = url[len("http://") :].partition("/")
    host, _, port = hostport.partition(":")
    data = b"" if body is None else json.dumps(body).encode()
    head = [
        f"{method} /{path} HTTP/1.1",
        f"Host: {hostport}",
        "Connection: close",
        f"Content-Length: {len(data)}",
    ]
    if body is not None:
        head.append("Content-Type: application/json")
    if token:
        head.append(f"Authorization: Bearer {token}")

    async def go() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        header, _, payload = raw.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        return status, json.loads(payload) if payload else None

    return await asyncio.wait_for(go(), timeout)


async def chat(port: int, key: str, model: str) -> int:
    """The status of one small chat completion through a gateway on a fresh connection (a
    gateway with several workers answers on whichever worker the kernel picks)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return int(line.split(b" ", 2)[1])
