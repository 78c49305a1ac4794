"""A private control plane for the scaling benchmarks (``bench autoscale``, ``bench day``).

:func:`scaling_stack` creates a fresh database (migrated, dropped at the end), a Redis prefix
and a data dir of the run's own, and starts control api, Endpoint Worker, Job Worker (the
``local`` launcher, or ``slurm``: the project's single-node cluster, started or reused as
``hpcgate up`` does) and one gateway worker, plus a tenant with a key. The autoscaler is
started by the caller (:meth:`Stack.start_autoscaler`), which may choose its settings once the
models exist. On exit every process stops and the run's jobs are cancelled (they outlive the
Job Worker: their own sessions, or Slurm), whatever happened inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
import httpx

from bench.bench_db import create_database, drop_database
from bench.procs import free_port
from control.jobs.main import make_launcher
from control.jobs.naming import name_prefix
from control.jobs.settings import JobsSettings
from control.launchers.base import LauncherError
from hpcgate.supervisor import Supervisor, hpcgate_argv


async def rows(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@dataclass
class Stack:
    dsn: str
    api_url: str
    gateway_url: str
    gateway_port: int
    admin_token: str
    key: str
    sup: Supervisor

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"}

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with httpx.AsyncClient(base_url=self.api_url, headers=self.admin_headers, timeout=10) as api:
            r = await api.request(method, path, json=body)
            if r.status_code >= 400:
                raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
            return r.json() if r.content else None

    async def start_autoscaler(self, env: dict[str, str]) -> None:
        """Start the autoscaler with ``env`` (``HPCGATE_AUTOSCALER_*``) on top of the stack's."""
        self.sup.env.update(env)
        await self.sup.start("autoscaler", hpcgate_argv("control", "autoscaler"), "autoscaler_started")

    async def wait_ready(self, model: str, instances: int, timeout_s: float) -> None:
        """Until ``instances`` of ``model``'s jobs are ready and the gateway lists it ready."""
        deadline = time.monotonic() + timeout_s
        auth = {"authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                [row] = await rows(
                    self.dsn,
                    "SELECT count(*) AS n FROM ai_model_endpoint_jobs j JOIN ai_model_configurations m "
                    "USING (model_id) WHERE m.name = $1 AND j.state = 'ready'",
                    model,
                )
                r = await http.get(f"{self.gateway_url}/v1/models", headers=auth)
                listed = r.status_code == 200 and any(
                    m["id"] == model and m.get("state") == "ready" for m in r.json()["data"]
                )
                if row["n"] >= instances and (listed or instances == 0):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{model}: {row['n']} of {instances} instance(s) ready after {timeout_s:.0f} s"
                    )
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def scaling_stack(
    *, admin_dsn: str, redis_url: str, launcher: Literal["local", "slurm"], label: str, env: dict[str, str]
) -> AsyncIterator[Stack]:
    """The stack described in the module docstring; ``env`` adds or overrides ``HPCGATE_*``."""
    name, dsn = await create_database(admin_dsn, label)
    tmp = tempfile.mkdtemp(prefix=f"hpcgate-bench-{label}-")
    api_port, gw_port = free_port(), free_port()
    admin_token, base = secrets.token_urlsafe(16), 21000 + (os.getpid() % 90) * 100
    job_prefix = f"bench{uuid.uuid4().hex[:8]}"
    full = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")}
    full.update(
        HPCGATE_DATABASE_URL=dsn,
        HPCGATE_REDIS_URL=redis_url,
        HPCGATE_REDIS_PREFIX=f"bench-{label}-{uuid.uuid4().hex[:8]}:",
        HPCGATE_ADMIN_TOKEN=admin_token,
        HPCGATE_KEY_HASH_SECRET=secrets.token_urlsafe(16),
        HPCGATE_CONTROL_URL=f"http://127.0.0.1:{api_port}",
        HPCGATE_DATA_DIR=tmp,
        HPCGATE_LOG_LEVEL="info",
        HPCGATE_API_PORT_RANGE_START=str(base),
        HPCGATE_API_PORT_RANGE_END=str(base + 99),
        HPCGATE_HEALTH_PROBE_INTERVAL_S="0.2",
        HPCGATE_HEALTH_PUBLISH_INTERVAL_S="1",
        HPCGATE_JOBS_INTERVAL_S="0.5",
        HPCGATE_JOBS_JOB_NAME_PREFIX=job_prefix,
    )
    if launcher == "slurm":
        from hpcgate.up import slurm_env

        reach = await asyncio.to_thread(slurm_env)
        full.update(reach)
        os.environ.update(reach)  # this process cancels the run's jobs at the end (squeue, scancel)
        full["HPCGATE_JOBS_OUTPUT_DIR"] = str(Path(tmp) / "jobs")
    full.update(env)
    sup = Supervisor(Path(tmp) / "logs", full)
    try:
        await sup.start("api", hpcgate_argv("control", "api", "--port", str(api_port)), "api_listening")
        await sup.start("health", hpcgate_argv("control", "health"), "health_worker_started")
        await sup.start(
            "jobs", hpcgate_argv("control", "jobs", "--launcher", launcher), "jobs_worker_started"
        )
        await sup.start("gateway", hpcgate_argv("gateway", "--port", str(gw_port)), "gateway_listening")
        stack = Stack(
            dsn=dsn,
            api_url=f"http://127.0.0.1:{api_port}",
            gateway_url=f"http://127.0.0.1:{gw_port}",
            gateway_port=gw_port,
            admin_token=admin_token,
            key="",
            sup=sup,
        )
        await stack.admin("POST", "/admin/tenants", {"name": "bench"})
        stack.key = (await stack.admin("POST", "/admin/tenants/bench/keys", {}))["key"]
        yield stack
    finally:
        await sup.stop_all()
        jobs = make_launcher(JobsSettings(launcher=launcher, data_dir=tmp, job_name_prefix=job_prefix))
        try:
            for left in await jobs.observe(name_prefix(job_prefix)):
                if left.alive:
                    await jobs.cancel(left.launcher_job_id)
        except LauncherError as exc:
            print(f"warning: cannot cancel this run's jobs (prefix {job_prefix}): {exc}", file=sys.stderr)
        finally:
            await jobs.close()
        await drop_database(admin_dsn, name)
