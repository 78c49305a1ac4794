"""``hpcgate up``: the whole stack on this machine, until Ctrl-C.

Brings up, in order: the database schema (creating the database if needed), the control API,
the Endpoint Worker, the Job Worker (local processes by default, or the project's single-node
Slurm with ``--launcher slurm``), the autoscaler (the demo model has min 0: it scales between
zero and ``instances`` with its load), and the gateway; then makes sure a demo tenant and a model
served by simulated vLLM instances exist, issues a fresh API key, waits until the model has a
ready instance, and prints the gateway URL and the key.

Invariants: idempotent (the tenant and model are created or updated, the admin token and
key-hash secret persist in ``<data_dir>/secrets.json`` so earlier keys keep working, and the
demo key is kept there too and reused while it is active, so repeated runs leave one key, not
one per run); ``<data_dir>/stack.json`` names the running stack's control URL, so
``hpcgate admin`` run from the same directory needs no settings, and ``<data_dir>/env.sh``
(mode 0600) holds the ``export`` lines for other shells (admin URL and token, ``SLURM_CONF``); every
child is started with a readiness check, never a sleep; on Ctrl-C the model is scaled to zero
so its instances end, then the daemons stop in reverse order; a child that dies stops the
whole stack with its log tail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import orjson
import redis.asyncio as aioredis

from control.admin_client import AdminApiError, AdminClient
from control.db.migrate import migrate
from control.http_client import tool_client
from control.wire import ApiKey, Job, KeyCreated, Model, Tenant
from hpcgate.logs import setup_logging
from hpcgate.schemas import key_prefix
from hpcgate.settings import LogLevel, Port, PostgresUrl, RedisUrl, load_settings
from hpcgate.supervisor import ChildFailedError, Supervisor, hpcgate_argv

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


class UpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: PostgresUrl = "postgresql://postgres@127.0.0.1:5432/hpcgate"
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "hpcgate:"
    data_dir: str = "var/up"
    log_level: LogLevel = "warning"
    host: str = "127.0.0.1"
    gateway_port: Port = 8080
    api_port: Port = 8081
    gateway_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    launcher: Literal["local", "slurm"] = "local"
    model: str = "demo"
    instances: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    tenant: str = "demo"
    ready_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 180.0


class Secrets(msgspec.Struct, frozen=True):
    admin_token: str
    key_hash_secret: str
    demo_key: str | None = None  # the demo tenant's key, reused by the next run while active


class StackInfo(msgspec.Struct, frozen=True):
    """``<data_dir>/stack.json``: where the stack ``up`` runs is (no secrets; see Secrets)."""

    control_url: str
    gateway_url: str


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (mode 0600, also when it existed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def load_secrets(path: Path) -> Secrets:
    """The deployment's admin token and key-hash secret, created once and kept (mode 0600)."""
    if path.exists():
        try:
            return msgspec.json.decode(path.read_bytes(), type=Secrets)
        except msgspec.DecodeError as exc:
            raise SystemExit(f"hpcgate up: error: {path} is damaged ({exc}); remove it to start afresh") \
                from None
    found = Secrets(admin_token=secrets.token_urlsafe(24), key_hash_secret=secrets.token_urlsafe(32))
    write_private(path, msgspec.json.encode(found))
    return found


async def ensure_database(dsn: str) -> None:
    """Create the database if it does not exist, then apply the migrations."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        base, _, name = dsn.rpartition("/")
        name = name.split("?", 1)[0]
        admin = await asyncpg.connect(f"{base}/postgres", timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await admin.close()
        conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def check_redis(url: str) -> None:
    client = aioredis.from_url(url, socket_connect_timeout=5)
    try:
        await client.ping()
    finally:
        await client.aclose()


def _where(url: str) -> tuple[str, str]:
    """``user`` and ``host:port`` of a database URL, for messages (never the password)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return parts.username or "(none)", f"{parts.hostname or 'localhost'}{port}"


def postgres_hint(url: str, exc: BaseException) -> str:
    """What failed reaching PostgreSQL and what to check, by the kind of failure."""
    user, where = _where(url)
    if isinstance(exc, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        return (f"PostgreSQL at {where} refused authentication for user {user!r} ({exc}); check the user "
                "and password in HPCGATE_DATABASE_URL and the server's pg_hba.conf")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return (f"PostgreSQL user {user!r} at {where} may not do this ({exc}); it needs to create the "
                "database or own it (CREATE DATABASE, CREATE TABLE)")
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return (f"cannot reach PostgreSQL at {where} ({exc or type(exc).__name__}); is it running there? "
                "(./dev.sh up starts a local one)")
    return f"PostgreSQL at {where} as user {user!r}: {exc}"


def redis_hint(url: str, exc: BaseException) -> str:
    _, where = _where(url)
    if isinstance(exc, aioredis.AuthenticationError):
        return f"Redis at {where} refused authentication ({exc}); check the password in HPCGATE_REDIS_URL"
    if isinstance(exc, (OSError, aioredis.ConnectionError, aioredis.TimeoutError)):
        return f"cannot reach Redis at {where} ({exc}); is it running there? (./dev.sh up starts a local one)"
    return f"Redis at {where}: {exc}"


def slurm_env() -> dict[str, str]:
    """Start (or reuse) the project's single-node Slurm; returns the variables that reach it."""
    out = subprocess.run(
        [str(ROOT / "slurm/local/start-cluster.sh")], check=True, capture_output=True, text=True, timeout=600
    ).stdout
    return dict(
        line[len("export "):].split("=", 1) for line in out.splitlines() if line.startswith("export ")
    )


def say(text: str) -> None:
    print(text, flush=True)


class Stack:
    def __init__(self, settings: UpSettings, data_dir: Path, secrets_: Secrets) -> None:
        self.s = settings
        self.data_dir = data_dir
        self.secrets = secrets_
        self.control_url = f"http://{settings.host}:{settings.api_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")}
        env.update(
            HPCGATE_DATABASE_URL=settings.database_url,
            HPCGATE_REDIS_URL=settings.redis_url,
            HPCGATE_REDIS_PREFIX=settings.redis_prefix,
            HPCGATE_ADMIN_TOKEN=secrets_.admin_token,
            HPCGATE_KEY_HASH_SECRET=secrets_.key_hash_secret,
            HPCGATE_CONTROL_URL=self.control_url,
            HPCGATE_DATA_DIR=str(data_dir),
            HPCGATE_LOG_LEVEL="info",
        )
        self.sup = Supervisor(data_dir / "logs", env)
        self.admin = AdminClient(self.control_url, secrets_.admin_token)
        self.slurm_conf: str | None = None

    async def start_daemons(self) -> None:
        s = self.s
        if s.launcher == "slurm":
            say("starting the local Slurm cluster ...")
            self.sup.env.update(await asyncio.to_thread(slurm_env))
            self.slurm_conf = self.sup.env.get("SLURM_CONF")
        say("starting control api, health worker, job worker, autoscaler ...")
        await self.sup.start("control-api", hpcgate_argv("control", "api", "--host", s.host, "--port",
                                                         str(s.api_port)), "api_listening")
        await self.sup.start("control-health", hpcgate_argv("control", "health"), "health_worker_started")
        await self.sup.start("control-jobs", hpcgate_argv("control", "jobs", "--launcher", s.launcher),
                             "jobs_worker_started")
        await self.sup.start("control-autoscaler", hpcgate_argv("control", "autoscaler"),
                             "autoscaler_started")
        say("starting the gateway ...")
        await self.sup.start(
            "gateway",
            hpcgate_argv("gateway", "--host", s.host, "--port", str(s.gateway_port),
                         "--workers", str(s.gateway_workers)),
            "gateway_listening",
        )

    async def _admin(self, cls: type[T], method: str, path: str, body: object = None) -> T:
        return await asyncio.to_thread(self.admin.call, cls, method, path, body)

    async def demo_key(self) -> str:
        """The demo tenant's key of an earlier run if it is still active, else a new one (kept)."""
        s, old = self.s, self.secrets.demo_key
        if old:
            keys = await asyncio.to_thread(self.admin.call, list[ApiKey], "GET", "/admin/keys",
                                           None, {"prefix": key_prefix(old), "tenant": s.tenant})
            if any(k.active for k in keys):
                return old
        created = await self._admin(KeyCreated, "POST", f"/admin/tenants/{s.tenant}/keys",
                                    {"description": "hpcgate up"})
        self.secrets = msgspec.structs.replace(self.secrets, demo_key=created.key)
        write_private(self.data_dir / "secrets.json", msgspec.json.encode(self.secrets))
        return created.key

    def write_stack_files(self) -> None:
        """stack.json (the CLI finds the stack by it) and env.sh (export lines for other shells)."""
        s = self.s
        info = StackInfo(control_url=self.control_url, gateway_url=f"http://{s.host}:{s.gateway_port}/v1")
        (self.data_dir / "stack.json").write_bytes(msgspec.json.encode(info))
        exports = "".join(f"export {line}\n" for line in self.export_lines())
        write_private(self.data_dir / "env.sh", exports.encode())

    def cli_hint(self) -> str:
        """How to run the admin CLI from this shell: it finds the stack in its default data dir."""
        if self.data_dir == Path(UpSettings().data_dir).resolve():
            return f"hpcgate admin model list   (here in {Path.cwd()}: it reads {self.data_dir})"
        return f"HPCGATE_DATA_DIR={shlex.quote(str(self.data_dir))} hpcgate admin model list"

    def export_lines(self) -> list[str]:
        lines = [f"HPCGATE_CONTROL_URL={self.control_url}",
                 f"HPCGATE_ADMIN_TOKEN={shlex.quote(self.secrets.admin_token)}"]
        if self.slurm_conf:
            lines.append(f"SLURM_CONF={shlex.quote(self.slurm_conf)}")
        return lines

    async def ensure_demo(self) -> str:
        """Create or update the demo tenant and model; return the demo tenant's API key."""
        s = self.s
        with contextlib.suppress(AdminApiError):  # 409: it exists already
            await self._admin(Tenant, "POST", "/admin/tenants", {"name": s.tenant})
        key = await self.demo_key()
        model = {"name": s.model, "slurm_template": "sim", "max_instances": max(s.instances, 1),
                 "desired_instances": s.instances}
        try:
            await self._admin(Model, "POST", "/admin/models", model)
        except AdminApiError as exc:
            if exc.status != 409:
                raise
            await self._admin(Model, "PATCH", f"/admin/models/{s.model}",
                              {"max_instances": max(s.instances, 1), "desired_instances": s.instances})
        return key

    async def wait_ready(self, key: str) -> None:
        """Poll the gateway's /v1/models as a client would, showing progress."""
        s = self.s
        deadline = time.monotonic() + s.ready_timeout_s
        last = ""
        while True:
            state = await asyncio.to_thread(self._model_state, key)
            if state != last:
                say(f"  model {s.model!r}: {state}")
                last = state
            if state == "ready" or s.instances == 0:
                return
            if time.monotonic() > deadline:
                raise ChildFailedError(f"model {s.model!r} not ready after {s.ready_timeout_s:.0f}s "
                                  f"(state {state}); see {self.data_dir / 'logs'}")
            await asyncio.sleep(0.5)

    def _model_state(self, key: str) -> str:
        try:
            with tool_client(5.0) as client:
                response = client.get(f"http://{self.s.host}:{self.s.gateway_port}/v1/models",
                                      headers={"authorization": f"Bearer {key}"})
            doc = orjson.loads(response.raise_for_status().content)
        except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
            return f"gateway not answering ({exc})"
        for entry in doc.get("data", []):
            if entry.get("id") == self.s.model:
                return str(entry.get("state", "listed"))
        return "not yet published"

    async def scale_down(self, timeout: float = 30.0) -> None:
        """Scale the demo model to zero and wait (bounded) until its jobs have ended."""
        with contextlib.suppress(AdminApiError, OSError):
            await self._admin(Model, "PATCH", f"/admin/models/{self.s.model}", {"desired_instances": 0})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                jobs = await self._admin(list[Job], "GET", "/admin/jobs")
                live = [j for j in jobs if j.model == self.s.model and j.state not in {"ended", "failed"}]
                if not live:
                    return
                await asyncio.sleep(0.5)


async def run(settings: UpSettings, data_dir: Path) -> int:
    secrets_ = load_secrets(data_dir / "secrets.json")
    say(f"hpcgate up: data in {data_dir}")
    try:
        await ensure_database(settings.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        say(f"hpcgate up: error: {postgres_hint(settings.database_url, exc)}")
        return 1
    try:
        await check_redis(settings.redis_url)
    except (OSError, aioredis.RedisError) as exc:
        say(f"hpcgate up: error: {redis_hint(settings.redis_url, exc)}")
        return 1

    stack = Stack(settings, data_dir, secrets_)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        await stack.start_daemons()
        stack.write_stack_files()
        key = await stack.ensure_demo()
        say(f"waiting for {settings.instances} simulated vLLM instance(s) of {settings.model!r} "
            f"({settings.launcher} launcher) ...")
        await stack.wait_ready(key)
        url = f"http://{settings.host}:{settings.gateway_port}/v1"
        say("")
        say("hpcgate is up.")
        say(f"  gateway URL : {url}")
        say(f"  API key     : {key}")
        say(f"  model       : {settings.model}")
        say(f"  admin API   : {stack.control_url}  (token in {data_dir / 'secrets.json'})")
        say(f"  admin CLI   : {stack.cli_hint()}")
        say(f"  elsewhere   : . {data_dir / 'env.sh'}   (or:)")
        for line in stack.export_lines():
            say(f"                export {line}")
        say(f"  logs        : {data_dir / 'logs'}")
        say(f"  try         : curl -N {url}/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{{\"model\": \"{settings.model}\", \"stream\": true, "
            f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
        say("Ctrl-C stops everything.")
        waiter = asyncio.ensure_future(stack.sup.wait_any_exit())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            child = waiter.result()
            say(f"hpcgate up: {child.name} exited; stopping. Last lines of {child.log_path}:\n{child.tail()}")
            code = 1
        for fut in (waiter, stopper):
            fut.cancel()
    except (ChildFailedError, AdminApiError) as exc:
        say(f"hpcgate up: error: {exc}")
        code = 1
    finally:
        say("stopping ...")
        if any(c.name == "control-jobs" and c.running for c in stack.sup.children):
            await stack.scale_down()
        await stack.sup.stop_all()
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcgate up",
                                     description="Run the whole stack on this machine until Ctrl-C.")
    parser.add_argument("--launcher", choices=["local", "slurm"], help="how instances run (default local)")
    parser.add_argument("--instances", type=int, help="simulated instances of the demo model (default 2)")
    parser.add_argument("--gateway-port", type=int, help="default 8080")
    parser.add_argument("--api-port", type=int, help="control API port (default 8081)")
    parser.add_argument("--data-dir", help="logs, secrets and job state (default ./var/up)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(UpSettings, "up", overrides=vars(args))
    setup_logging(settings.log_level)
    try:
        return asyncio.run(run(settings, Path(settings.data_dir).resolve()))
    except KeyboardInterrupt:
        return 130
