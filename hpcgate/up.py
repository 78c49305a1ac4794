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
child is started with a readiness check, never a sleep; a child that dies stops the whole stack
with its log tail.

Lifecycle (docs/operations.md, "hpcgate up: process lifecycle"): one ``up`` per database (an
advisory lock held for the process's life); every daemon and local instance dies with ``up``
(parent-death signal), and the next run clears what a killed one left (``run.json``'s daemons,
live jobs of any launcher) or says what is in the way; each run has its own logs. Ctrl-C stops
at once at every stage of the start; once up, it drains for ``stop_grace_s``, cancels every
instance through its launcher, then stops the daemons; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import asyncpg
import httpx
import msgspec
import orjson
import redis.asyncio as aioredis

from control.admin_client import AdminApiError, AdminClient
from control.launchers.base import LauncherError
from control.wire import ApiKey, Job, KeyCreated, Model, Tenant
from hpcgate.lifecycle import install_stop_signals
from hpcgate.logs import setup_logging
from hpcgate.schemas import key_prefix
from hpcgate.settings import LogLevel, Port, PostgresUrl, RedisUrl, load_settings
from hpcgate.supervisor import ChildFailedError, Supervisor, hpcgate_argv
from hpcgate.up_jobs import end_jobs, jobs_settings, live_jobs
from hpcgate.up_preflight import (
    UpError,
    check_redis,
    check_redis_prefix,
    clear_stale,
    ensure_database,
    postgres_hint,
    redis_hint,
    release_redis_prefix,
    take_up_lock,
)
from hpcgate.up_state import (
    Proc,
    RunRecord,
    proc_start,
    rotate_logs,
    this_process,
    write_record,
)

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
    # On stop: how long requests in flight may drain before every instance is cancelled.
    stop_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0


class Secrets(msgspec.Struct, frozen=True):
    admin_token: str
    key_hash_secret: str
    demo_key: str | None = None  # the demo tenant's key, reused by the next run while active
    internal_token: str = ""  # gateway <-> control API and batch runner -> gateway (batch APIs)


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
            held = msgspec.json.decode(path.read_bytes(), type=Secrets)
        except msgspec.DecodeError as exc:
            raise SystemExit(f"hpcgate up: error: {path} is damaged ({exc}); remove it to start afresh") \
                from None
        if held.internal_token:
            return held
        held = msgspec.structs.replace(held, internal_token=secrets.token_urlsafe(32))  # an older data dir
        write_private(path, msgspec.json.encode(held))
        return held
    found = Secrets(admin_token=secrets.token_urlsafe(24), key_hash_secret=secrets.token_urlsafe(32),
                    internal_token=secrets.token_urlsafe(32))
    write_private(path, msgspec.json.encode(found))
    return found


def slurm_env() -> dict[str, str]:
    """Start (or reuse) the project's single-node Slurm; returns the variables that reach it."""
    out = subprocess.run(
        [str(ROOT / "slurm/local/start-cluster.sh")], check=True, capture_output=True, text=True, timeout=600
    ).stdout
    return _exports(out)


def _exports(out: str) -> dict[str, str]:
    return dict(line[len("export "):].split("=", 1) for line in out.splitlines()
                if line.startswith("export "))


async def slurm_env_async() -> dict[str, str]:
    """:func:`slurm_env` as a subprocess of this loop, not a thread: Ctrl-C cancels it at once
    (and kills the script)."""
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "slurm/local/start-cluster.sh"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 600)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise ChildFailedError(f"slurm/local/start-cluster.sh failed: {err.decode(errors='replace')[-800:]}")
    return _exports(out.decode())


def say(text: str) -> None:
    print(text, flush=True)


class Stack:
    def __init__(self, settings: UpSettings, data_dir: Path, secrets_: Secrets) -> None:
        self.s = settings
        self.data_dir = data_dir
        self.secrets = secrets_
        self.control_url = f"http://{settings.host}:{settings.api_port}"
        # Settings of the control daemons pass through (a site's templates, failure policy, the
        # instances' port range); every other HPCGATE_* is up's to set (flags win over these).
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")
               or k.startswith(("HPCGATE_JOBS_", "HPCGATE_HEALTH_", "HPCGATE_API_"))}
        env.update(
            HPCGATE_DATABASE_URL=settings.database_url,
            HPCGATE_REDIS_URL=settings.redis_url,
            HPCGATE_REDIS_PREFIX=settings.redis_prefix,
            HPCGATE_ADMIN_TOKEN=secrets_.admin_token,
            HPCGATE_KEY_HASH_SECRET=secrets_.key_hash_secret,
            HPCGATE_CONTROL_URL=self.control_url,
            HPCGATE_DATA_DIR=str(data_dir),
            HPCGATE_LOG_LEVEL="info",
            HPCGATE_JOBS_LOCAL_END_WITH_WORKER="true",  # local instances end with the Job Worker
            HPCGATE_JOBS_END_JOBS_WHEN_ORPHANED="true",  # Slurm jobs end when up dies, even of SIGKILL
            # The Files and Batch APIs: relayed by the gateway to the control API, run by the runner.
            HPCGATE_INTERNAL_TOKEN=secrets_.internal_token,
            HPCGATE_BATCH_DIR=str(data_dir / "batch"),
            HPCGATE_GATEWAY_BATCH_API_URL=self.control_url,
            HPCGATE_BATCHES_GATEWAY_URL=f"http://{settings.host}:{settings.gateway_port}",
        )
        self.sup = Supervisor(data_dir / "logs", env, on_spawn=lambda _child: self.write_record())
        self.admin = AdminClient(self.control_url, secrets_.admin_token)
        self.slurm_conf: str | None = None

    async def use_slurm(self) -> None:
        """Start (or reuse) the local Slurm cluster; its variables reach the children and the
        Slurm launcher of this process (which ends leftover jobs)."""
        if self.slurm_conf is None:
            exports = await slurm_env_async()
            self.sup.env.update(exports)
            os.environ.update(exports)
            self.slurm_conf = exports.get("SLURM_CONF")

    def write_record(self) -> None:
        """``run.json``: this process and its daemons, for the next run after a crash."""
        children = [Proc(c.name, c.proc.pid, proc_start(c.proc.pid) or 0)
                    for c in self.sup.children if c.proc is not None]
        write_record(self.data_dir / "run.json",
                     RunRecord(up=this_process(), data_dir=str(self.data_dir), children=children))

    async def end_jobs(self, reason: str, wait_s: float = 15.0) -> None:
        """End every live instance in the database, through the launcher that started it."""
        s = self.s
        settings = jobs_settings(s.database_url, self.data_dir, s.launcher)
        if s.launcher != "slurm":
            # Slurm jobs left by an earlier `up --launcher slurm` need the cluster to cancel them.
            conn = await asyncpg.connect(s.database_url, timeout=10)
            try:
                kinds = {j.launcher for j in await live_jobs(conn)}
            finally:
                await conn.close()
            if "slurm" in kinds:
                say("  starting the local Slurm cluster to end the Slurm jobs of an earlier run ...")
                await self.use_slurm()
        await end_jobs(s.database_url, settings, reason, say, wait_s)

    async def start_daemons(self) -> None:
        s = self.s
        if s.launcher == "slurm":
            say("starting the local Slurm cluster ...")
            await self.use_slurm()
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
        await self.sup.start("control-batches", hpcgate_argv("control", "batches"), "batch_runner_started")

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
        """Poll the gateway's /v1/models as a client would, showing progress; a failed model ends
        the wait with the reason its jobs gave (their log's last lines)."""
        s = self.s
        deadline = time.monotonic() + s.ready_timeout_s
        last = ""
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            while True:
                state = await self._model_state(client, key)
                if state != last:
                    say(f"  model {s.model!r}: {state}")
                    last = state
                if state == "ready" or s.instances == 0:
                    return
                if state == "failed":
                    raise ChildFailedError(await self.failure_reason())
                if time.monotonic() > deadline:
                    raise ChildFailedError(f"model {s.model!r} not ready after {s.ready_timeout_s:.0f}s "
                                           f"(state {state}); see {self.data_dir / 'logs'}")
                await asyncio.sleep(0.5)

    async def failure_reason(self) -> str:
        """Why the model failed: its state reason and the last failed job's (with its output)."""
        s = self.s
        model = await self._admin(Model, "GET", f"/admin/models/{s.model}")
        jobs = await self._admin(list[Job], "GET", "/admin/jobs")
        ended = [j for j in jobs if j.model == s.model and j.state in {"ended", "failed"} and j.state_reason]
        text = f"model {s.model!r} failed: {model.state_reason or 'no reason recorded'}"
        last = max(ended, key=lambda j: j.endpoint_job_id, default=None)
        if last is not None and last.state_reason and last.state_reason not in text:
            text += f"\n  last job {last.endpoint_job_id}: {last.state_reason}"
        return text + f"\n  job logs: {self.data_dir / 'jobs'}"

    async def _model_state(self, client: httpx.AsyncClient, key: str) -> str:
        try:
            response = await client.get(f"http://{self.s.host}:{self.s.gateway_port}/v1/models",
                                        headers={"authorization": f"Bearer {key}"})
            doc = orjson.loads(response.raise_for_status().content)
        except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
            return f"gateway not answering ({exc})"
        for entry in doc.get("data", []):
            if entry.get("id") == self.s.model:
                return str(entry.get("state", "listed"))
        return "not yet published"

    async def scale_down(self, timeout: float = 30.0) -> None:
        """Scale the demo model to zero and give its instances ``timeout`` to drain and end,
        showing what is waited for; what is left then is cancelled by :meth:`end_jobs`."""
        with contextlib.suppress(AdminApiError, OSError, httpx.HTTPError):
            await self._admin(Model, "PATCH", f"/admin/models/{self.s.model}", {"desired_instances": 0})
            deadline = time.monotonic() + timeout
            shown = ""
            while time.monotonic() < deadline:
                jobs = await self._admin(list[Job], "GET", "/admin/jobs")
                live = [j for j in jobs if j.state not in {"ended", "failed"}]
                if not live:
                    return
                text = "  draining: " + "; ".join(
                    f"job {j.endpoint_job_id} of {j.model!r} ({j.launcher} {j.launcher_job_id or '-'}, "
                    f"{j.state})" for j in live)
                if text != shown:
                    say(text)
                    shown = text
                await asyncio.sleep(0.25)


class StartInterruptedError(Exception):
    """Ctrl-C (SIGINT) or SIGTERM arrived while ``up`` was starting."""


async def preflight(settings: UpSettings, data_dir: Path) -> asyncpg.Connection:
    """Database (created and migrated), Redis, the ``up`` lock, the Redis prefix (not another
    deployment's), and stale state of this data dir."""
    try:
        await ensure_database(settings.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise UpError(postgres_hint(settings.database_url, exc)) from None
    try:
        await check_redis(settings.redis_url)
    except (OSError, aioredis.RedisError) as exc:
        raise UpError(redis_hint(settings.redis_url, exc)) from None
    lock = await take_up_lock(settings.database_url, data_dir)
    try:
        await check_redis_prefix(settings.redis_url, settings.redis_prefix, lock)
        await asyncio.to_thread(clear_stale, data_dir, [(settings.host, settings.gateway_port),
                                                         (settings.host, settings.api_port)])
    except BaseException:
        await lock.close()
        raise
    return lock


async def start(stack: Stack) -> str:
    """Everything up to "ready": returns the demo key."""
    settings = stack.s
    await stack.end_jobs("left by an earlier hpcgate up", wait_s=15.0)
    rotate_logs(stack.data_dir / "logs")  # this run's logs are its own (the last run's: *.log.1)
    await stack.start_daemons()
    stack.write_stack_files()
    key = await stack.ensure_demo()
    say(f"waiting for {settings.instances} simulated vLLM instance(s) of {settings.model!r} "
        f"({settings.launcher} launcher) ...")
    await stack.wait_ready(key)
    return key


async def until_stopped(stop: asyncio.Event, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless ``stop`` is set first: then cancel it at once and raise StartInterruptedError."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise StartInterruptedError


def print_banner(stack: Stack, key: str) -> None:
    settings, data_dir = stack.s, stack.data_dir
    url = f"http://{settings.host}:{settings.gateway_port}/v1"
    say("")
    say("hpcgate is up.")
    say(f"  gateway URL : {url}")
    say(f"  API key     : {key}")
    say(f"  model       : {settings.model}")
    say(f"  admin API   : {stack.control_url}  (token in {data_dir / 'secrets.json'})")
    say(f"  admin CLI   : {stack.cli_hint()}")
    say("  operator    : hpcgate admin ui   (prints a login link to the read-only status page)")
    say(f"  elsewhere   : . {data_dir / 'env.sh'}   (or:)")
    for line in stack.export_lines():
        say(f"                export {line}")
    say(f"  logs        : {data_dir / 'logs'}")
    say(f"  try         : curl -N {url}/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{{\"model\": \"{settings.model}\", \"stream\": true, "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
    say("Ctrl-C stops everything (a second Ctrl-C exits at once).")


async def shut_down(stack: Stack, drain: bool) -> None:
    """Drain for ``stop_grace_s`` (only once the stack served: while starting, Ctrl-C stops at
    once), stop the Job Worker, cancel every instance still running, stop the other daemons."""
    if drain and any(c.name == "control-api" and c.running for c in stack.sup.children):
        await stack.scale_down(stack.s.stop_grace_s)
    await stack.sup.stop("control-jobs", grace=10.0)  # it would replace what is cancelled next
    with contextlib.suppress(OSError, asyncpg.PostgresError, LauncherError):
        await stack.end_jobs("stopped with hpcgate up", wait_s=15.0)
    await stack.sup.stop_all(grace=10.0)
    (stack.data_dir / "run.json").unlink(missing_ok=True)


async def run(settings: UpSettings, data_dir: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    install_stop_signals(loop, stop.set)  # the first stops (cleanly); a second exits at once
    secrets_ = load_secrets(data_dir / "secrets.json")
    say(f"hpcgate up: data in {data_dir}")
    try:
        lock = await until_stopped(stop, preflight(settings, data_dir))
    except (UpError, OSError, asyncpg.PostgresError) as exc:
        say(f"hpcgate up: error: {exc}")
        return 1
    except StartInterruptedError:
        say("hpcgate up: interrupted")
        return 130
    stack = Stack(settings, data_dir, secrets_)
    stack.write_record()
    code = 0
    served = False
    try:
        key = await until_stopped(stop, start(stack))
        served = True
        print_banner(stack, key)
        waiter = asyncio.ensure_future(stack.sup.wait_any_exit())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            child = waiter.result()
            say(f"hpcgate up: {child.name} exited; stopping. Last lines of {child.log_path}:\n{child.tail()}")
            code = 1
        for fut in (waiter, stopper):
            fut.cancel()
    except StartInterruptedError:
        say("hpcgate up: interrupted while starting")
        code = 130
    except (ChildFailedError, AdminApiError, UpError, LauncherError) as exc:
        say(f"hpcgate up: error: {exc}")
        code = 1
    finally:
        say("stopping ...")
        try:
            await shut_down(stack, drain=served)
            await release_redis_prefix(settings.redis_url, settings.redis_prefix, lock)
        finally:
            await lock.close()
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
