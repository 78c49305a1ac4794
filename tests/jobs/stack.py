"""Real control-plane processes for the Job Worker's integration and end-to-end tests.

Each daemon runs as a real subprocess (``hpcgate control api|health|jobs``, ``hpcgate gateway``)
with the test session's database and Redis prefix; readiness is a JSON event on its output,
never a sleep. ``Daemon.stop()`` sends SIGTERM, then SIGKILL; ``kill9()`` is the crash case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from control.jobs import store
from control.jobs.reconcile import JobWorker
from control.jobs.render import render_text
from control.jobs.settings import JobsSettings
from control.launchers.base import JobSpec, Launcher
from control.store.tokens import hash_registration_token, new_registration_token
from hpcgate.settings import COMMON_FIELDS
from tests.support.procs import child_env, hpcgate_cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._readers = [asyncio.ensure_future(self._read(s)) for s in (proc.stdout, proc.stderr) if s]
        self._changed = asyncio.Event()

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self.lines.append(text)
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(text))
            self._changed.set()

    def find(self, event: str, **fields: Any) -> dict[str, Any] | None:
        for e in self.events:
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                return e
        return None

    async def wait_event(self, event: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, **fields)
            if found is not None:
                return found
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {event}: "
                                     + "\n".join(self.lines[-20:]))
            left = deadline - time.monotonic()
            if left <= 0:
                tail = "\n".join(self.lines[-20:])
                raise AssertionError(f"{self.name}: no {event} within {timeout}s: {tail}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def stop(self, timeout: float = 10.0) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for r in self._readers:
            r.cancel()
        return self.proc.returncode or 0

    async def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


async def start_daemon(name: str, args: list[str], env: dict[str, str], ready: str,
                       timeout: float = 30.0) -> Daemon:
    proc = await asyncio.create_subprocess_exec(
        *hpcgate_cmd(*args), env=child_env(**env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    daemon = Daemon(name, proc)
    try:
        await daemon.wait_event(ready, timeout)
    except BaseException:
        await daemon.stop()
        raise
    return daemon


class Admin:
    """A minimal client of the admin API (the CLI and its tests belong to the control plane)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        host, _, port = self.base.removeprefix("http://").partition(":")
        payload = b"" if body is None else msgspec.json.encode(body)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write((f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n"
                          "Connection: close\r\n\r\n").encode() + payload)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, raw = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            out = bytearray()
            while raw:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                if size == 0:
                    break
                out += raw[:size]
                raw = raw[size + 2:]
            raw = bytes(out)
        return status, (json.loads(raw) if raw.strip() else None)


class ControlPlane:
    """``control api`` + ``control health`` on the session's database and Redis prefix."""

    def __init__(self, pg_dsn: str, redis_url: str, redis_prefix: str) -> None:
        self.pg_dsn = pg_dsn
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.api_port = free_port()
        self.admin_token = "test-admin-token-" + os.urandom(8).hex()
        self.key_hash_secret = "test-key-hash-secret-" + os.urandom(8).hex()
        self.daemons: list[Daemon] = []

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {"HPCGATE_DATABASE_URL": self.pg_dsn, "HPCGATE_REDIS_URL": self.redis_url,
                "HPCGATE_REDIS_PREFIX": self.redis_prefix, "HPCGATE_ADMIN_TOKEN": self.admin_token,
                "HPCGATE_KEY_HASH_SECRET": self.key_hash_secret, "HPCGATE_CONTROL_URL": self.control_url,
                **extra}

    async def start(self) -> None:
        # A port range of this run's own, so jobs never collide with stray servers of other runs,
        # below the kernel's ephemeral range (32768+, where port-0 servers and client sockets
        # live) and above the API's default range (20000-20999) that other tests use.
        base = random.randrange(21000, 32000, 100)
        api_env = self.env(HPCGATE_API_PORT_RANGE_START=str(base), HPCGATE_API_PORT_RANGE_END=str(base + 99))
        self.daemons.append(await start_daemon("api", ["control", "api", "--port", str(self.api_port)],
                                               api_env, "api_listening"))
        health_env = self.env(HPCGATE_HEALTH_PROBE_INTERVAL_S="0.2", HPCGATE_HEALTH_PUBLISH_INTERVAL_S="1")
        self.daemons.append(await start_daemon("health", ["control", "health"], health_env,
                                               "health_worker_started"))

    def admin(self) -> Admin:
        return Admin(self.control_url, self.admin_token)

    async def start_jobs(self, settings: dict[str, str], raw_env: dict[str, str] | None = None, *,
                         standby: bool = False) -> Daemon:
        """``settings``: JobsSettings fields (common ones like data_dir included) as strings.
        ``standby``: a second replica, ready once it has found the lock held."""
        env = self.env(**{(f"HPCGATE_{k.upper()}" if k in COMMON_FIELDS else f"HPCGATE_JOBS_{k.upper()}"): v
                          for k, v in settings.items()}, **(raw_env or {}))
        daemon = await start_daemon("jobs", ["control", "jobs"], env,
                                    "singleton_state" if standby else "jobs_worker_started")
        if standby:
            assert daemon.find("singleton_state", new="standby"), daemon.lines
        return daemon

    async def stop(self) -> None:
        for d in reversed(self.daemons):
            await d.stop()


@contextlib.asynccontextmanager
async def stopping(daemon: Daemon, plane: ControlPlane | None = None) -> AsyncIterator[Daemon]:
    """Stop ``daemon`` at the end; on an assertion failure, append the last log lines of it
    (and of the control plane's daemons) to the message."""
    try:
        yield daemon
    except AssertionError as exc:
        shown = [daemon, *(plane.daemons if plane else [])]
        tails = "\n".join(f"--- {d.name}:\n" + "\n".join(line[:400] for line in d.lines[-25:]) for d in shown)
        raise AssertionError(f"{exc}\n{tails}") from exc
    finally:
        await daemon.stop()


async def db_rows(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def poll(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll an async predicate (a real probe of real state) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


async def submit_without_recording(settings: JobsSettings, launcher: Launcher, model: str, workdir: Path,
                                   edit_script: Callable[[str], str] = lambda text: text) -> tuple[int, str]:
    """Leave exactly what a Job Worker killed between ``submit()`` and the database write leaves:
    a pending job row without a launcher id, and a launcher job carrying the row's name.
    Returns (endpoint_job_id, launcher_job_id)."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        worker = JobWorker(settings, pool, launcher)
        async with pool.acquire() as conn:
            row = next(m for m in await store.load_models(conn) if m.name == model)
            token = new_registration_token()
            job_id, name = await store.create_job(
                conn, model_id=row.model_id, model=model, generation=row.generation, launcher=launcher.kind,
                prefix=settings.job_name_prefix, replaces=None, walltime_s=None,
                token_hash=hash_registration_token(token), token_ttl_s=600)
        prep = worker._prepare(row)
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        output = str(workdir / f"{name}.out")
        ctx = msgspec.structs.replace(prep.ctx_base, name=name, endpoint_job_id=job_id, output_path=output)
        submitted = await launcher.submit(JobSpec(
            name=name, script=edit_script(render_text(prep.template_text, ctx)), output_path=output,
            workdir=str(workdir), secret_env={"HPCGATE_JOB_REGISTRATION_TOKEN": token}))
    finally:
        await pool.close()
    return job_id, submitted
