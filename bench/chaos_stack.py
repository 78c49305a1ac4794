"""The stack ``hpcgate bench chaos`` runs and breaks: private PostgreSQL and Redis, the daemons.

PostgreSQL and Redis are the chaos run's own: a cluster made with Debian's ``initdb`` in a
temporary directory and a ``redis-server`` without persistence, each on a free loopback port,
so restarting them never disturbs the shared servers other tests and helpers use. The daemons
are the ones ``hpcgate up`` runs (control api, Endpoint Worker, Job Worker with the local
launcher, the gateway with several workers), started with :class:`hpcgate.supervisor.Supervisor`
and its readiness events, with settings tightened so that faults are noticed within a second
or two.

Invariants: every process this module starts is stopped by :meth:`ChaosStack.close`, model
instances included (the local launcher runs each job in a session of its own, so they are found
by the port block this run hands out to registering jobs); PostgreSQL runs as the ``postgres``
user when we are root (``initdb`` refuses root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import sys
from pathlib import Path

import asyncpg
import httpx
import psutil  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from bench.chaos_load import MODEL
from control.db.migrate import migrate
from hpcgate.supervisor import Child, Supervisor, hpcgate_argv

# The events each daemon logs once it is ready (what ``hpcgate up`` waits for).
READY_EVENTS = {"control-api": "api_listening", "control-health": "health_worker_started",
                "control-jobs": "jobs_worker_started", "gateway": "gateway_listening"}

READY_SQL = """
SELECT e.port FROM ai_model_endpoints e JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
WHERE j.state = 'ready' AND e.ready_at IS NOT NULL AND NOT e.draining AND e.consecutive_failures = 0
"""


class StackError(Exception):
    """The stack could not be started; the message says which part and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin() -> Path:
    """Debian's newest PostgreSQL server binaries (``/usr/lib/postgresql/<v>/bin``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise StackError("PostgreSQL's initdb not found (Debian package postgresql)")
    return Path(initdb).parent


async def _wait_for(check: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if await check():  # type: ignore[operator]
                return
        except (TimeoutError, OSError, asyncpg.PostgresError, aioredis.RedisError):
            pass
        if loop.time() > deadline:
            raise StackError(f"{what} not ready after {timeout:.0f}s")
        await asyncio.sleep(0.1)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster: its own data directory, port and socket directory."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "pg"
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self._user: dict[str, object] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self._owner = (pw.pw_uid, pw.pw_gid)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def init(self) -> None:
        self.dir.mkdir(parents=True)
        if self._user:
            os.chmod(self.dir.parent, 0o711)  # postgres may pass through (not list) the run's directory
            os.chown(self.dir, *self._owner)
        proc = await asyncio.create_subprocess_exec(
            str(pg_bin() / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-N",
            "-E", "UTF8", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            **self._user)  # type: ignore[arg-type]
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise StackError(f"initdb failed: {err.decode(errors='replace')[-400:]}")

    async def start(self) -> None:
        log = (self.dir / "postgres.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            str(pg_bin() / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port),
            "-k", str(self.dir),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200",
            stdout=log, stderr=log, start_new_session=True, **self._user)  # type: ignore[arg-type]
        log.close()

        async def accepts() -> bool:
            conn = await asyncpg.connect(self.dsn(), timeout=2)
            await conn.close()
            return True

        await _wait_for(accepts, 30, "private PostgreSQL")

    async def stop(self, *, crash: bool = False) -> None:
        """A fast shutdown (SIGINT), or with ``crash`` an immediate one (SIGQUIT: every process
        exits at once, no checkpoint; the next start replays the WAL, as after a crash). Either
        way what was committed is kept: commits are synchronous (``fsync`` is off, which only
        matters if the machine itself goes down)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGQUIT if crash else signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class PrivateRedis:
    """A ``redis-server`` without persistence: a restart loses every key, as an unlucky one would."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self.dir), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)

        async def pong() -> bool:
            client = aioredis.from_url(self.url, socket_connect_timeout=1)
            try:
                return bool(await client.ping())
            finally:
                await client.aclose()

        await _wait_for(pong, 15, "private Redis")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


class ChaosStack:
    """The whole stack on loopback, with handles on every process a fault needs."""

    def __init__(self, root: Path, *, instances: int, gateway_workers: int, flush_s: float) -> None:
        self.root = root
        self.instances = instances
        self.gateway_workers = gateway_workers
        self.flush_s = flush_s
        self.pg = PrivatePostgres(root)
        self.redis = PrivateRedis(root)
        self.admin_token = secrets.token_urlsafe(16)
        self.api_port, self.gateway_port = free_port(), free_port()
        # ports handed to this run's instances: below the kernel's ephemeral range (32768 and up,
        # where any client's connection may hold one) and the tests' blocks (21000-32000)
        self.port_block = random.randrange(10000, 20000, 100)
        self.sup: Supervisor | None = None
        self.dsn = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")}
        env.update({
            "HPCGATE_DATABASE_URL": self.dsn, "HPCGATE_REDIS_URL": self.redis.url,
            "HPCGATE_REDIS_PREFIX": "chaos:", "HPCGATE_ADMIN_TOKEN": self.admin_token,
            "HPCGATE_KEY_HASH_SECRET": secrets.token_urlsafe(24), "HPCGATE_CONTROL_URL": self.api_url,
            "HPCGATE_DATA_DIR": str(self.root / "data"), "HPCGATE_LOG_LEVEL": "info",
            "HPCGATE_API_PORT_RANGE_START": str(self.port_block),
            "HPCGATE_API_PORT_RANGE_END": str(self.port_block + 99),
            # faults are noticed in a second or two, not in the production defaults' tens
            "HPCGATE_HEALTH_PROBE_INTERVAL_S": "0.25", "HPCGATE_HEALTH_PROBE_TIMEOUT_S": "1",
            "HPCGATE_HEALTH_UNROUTABLE_AFTER": "2", "HPCGATE_HEALTH_DEAD_AFTER": "8",
            "HPCGATE_HEALTH_PUBLISH_INTERVAL_S": "1", "HPCGATE_HEALTH_BACKOFF_MAX_S": "0.5",
            "HPCGATE_HEALTH_STANDBY_POLL_S": "0.5",
            "HPCGATE_JOBS_INTERVAL_S": "0.5", "HPCGATE_JOBS_DRAIN_GRACE_S": "0.5",
            "HPCGATE_JOBS_BACKOFF_BASE_S": "1", "HPCGATE_JOBS_BACKOFF_MAX_S": "5",
            "HPCGATE_JOBS_MAX_FAILURES": "10", "HPCGATE_JOBS_OUTAGE_BACKOFF_MAX_S": "1",
            "HPCGATE_JOBS_STANDBY_POLL_S": "0.5",
            "HPCGATE_JOBS_JOB_NAME_PREFIX": f"chaos{self.port_block}",
            "HPCGATE_GATEWAY_USAGE_FLUSH_S": str(self.flush_s), "HPCGATE_GATEWAY_SCRAPE_INTERVAL_S": "0.5",
            # a stalled instance's streams end with an error event after 3 s of silence
            "HPCGATE_GATEWAY_UPSTREAM_READ_TIMEOUT_S": "3", "HPCGATE_GATEWAY_ACCESS_LOG": "false",
            "HPCGATE_GATEWAY_REDIS_BACKOFF_MAX_S": "0.5",
        })
        return env

    async def start(self) -> None:
        await self.pg.init()
        await self.pg.start()
        self.dsn = self.pg.dsn("hpcgate")
        conn = await asyncpg.connect(self.pg.dsn(), timeout=10)
        try:
            await conn.execute('CREATE DATABASE "hpcgate"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        await self.redis.start()
        self.sup = Supervisor(self.root / "logs", self.env())
        for name in READY_EVENTS:
            await self.start_daemon(name)

    def argv(self, name: str) -> list[str]:
        return {
            "control-api": hpcgate_argv("control", "api", "--host", "127.0.0.1",
                                        "--port", str(self.api_port)),
            "control-health": hpcgate_argv("control", "health"),
            "control-jobs": hpcgate_argv("control", "jobs", "--launcher", "local"),
            "gateway": hpcgate_argv("gateway", "--host", "127.0.0.1", "--port", str(self.gateway_port),
                                    "--workers", str(self.gateway_workers)),
        }[name]

    async def start_daemon(self, name: str) -> Child:
        assert self.sup is not None
        return await self.sup.start(name, self.argv(name), READY_EVENTS[name], timeout=60)

    def daemon(self, name: str) -> Child:
        assert self.sup is not None
        return [c for c in self.sup.children if c.name == name][-1]

    async def admin(self, method: str, path: str, body: object = None) -> object:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.request(method, self.api_url + path, json=body,
                                     headers={"authorization": f"Bearer {self.admin_token}"})
        if r.status_code >= 300:
            raise StackError(f"admin {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    async def setup(self, tenants: int) -> dict[str, str]:
        """The model (simulated instances, 20 ms per token) and one key per tenant."""
        await self.admin("POST", "/admin/models", {
            "name": MODEL, "slurm_template": "sim", "slurm_resources": {"sim_profile": "paced"},
            "max_instances": self.instances, "desired_instances": self.instances})
        keys = {}
        for i in range(tenants):
            name = f"chaos-t{i}"
            await self.admin("POST", "/admin/tenants", {"name": name})
            created = await self.admin("POST", f"/admin/tenants/{name}/keys", {"description": "chaos"})
            keys[name] = str(created["key"])  # type: ignore[index]
        return keys

    async def sql(self, query: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn, timeout=2)
        try:
            return list(await conn.fetch(query, *args, timeout=5))
        finally:
            await conn.close()

    async def ready_ports(self) -> list[int] | None:
        """Ports of the ready, routable instances, or None while PostgreSQL cannot say."""
        try:
            return [int(r["port"]) for r in await self.sql(READY_SQL)]
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return None

    def gateway_tree(self) -> list[psutil.Process]:
        proc = self.daemon("gateway").proc
        assert proc is not None
        try:
            root = psutil.Process(proc.pid)
            return [root, *root.children()]
        except psutil.NoSuchProcess:
            return []

    def instances_by_port(self) -> dict[int, psutil.Process]:
        """This run's simulator processes (this installation's ``hpcgate sim --port N``, N in the
        port block)."""
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "sim" in cmd and "--port" in cmd and any(part.startswith(sys.prefix) for part in cmd[:2]):
                with contextlib.suppress(ValueError, IndexError):
                    port = int(cmd[cmd.index("--port") + 1])
                    if self.port_block <= port < self.port_block + 100:
                        found[port] = p
        return found

    async def close(self) -> None:
        if self.sup is not None:
            await self.sup.stop_all(grace=10)
        for p in self.instances_by_port().values():  # local jobs live in sessions of their own
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        await self.redis.stop()
        await self.pg.stop()
