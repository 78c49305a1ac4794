"""``hpcgate up``'s process lifecycle, with real processes and signals: SIGKILL of ``up`` takes
its daemons and its Slurm job along, a second ``up`` on the same database is refused naming
the first, the next ``up`` on the same data dir (here with the local launcher) ends the old
Slurm job's row and starts its own logs, Ctrl-C during a long stream cancels the local job after
a short drain grace, Ctrl-C while waiting for the model stops at once, and a model whose
instances fail ends the wait with the reason from the job's output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import openai
import pytest
import redis.asyncio as aioredis

from hpcgate.up_state import proc_start
from tests.support.procs import child_env, hpcgate_cmd, wait_until
from tests.support.services import REDIS_URL, drop_database, dsn_for, start_slurm, unique_name
from tests.up.test_up import _free_port, _read_until


@pytest.fixture
async def up_db() -> AsyncIterator[str]:
    """A database of this test's own (``up`` creates and migrates it); dropped afterwards."""
    name = unique_name("hpcgate_up_lc")
    yield dsn_for(name)
    await drop_database(name)


class Up:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.seen)

    async def until(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        assert self.proc.stdout is not None
        return await _read_until(self.proc.stdout, re.compile(pattern), self.seen, timeout)

    async def finish(self, timeout: float = 60) -> int:
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        self.seen.append(rest.decode())
        return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def up(env: dict[str, str], cwd: Path, *args: str) -> AsyncIterator[Up]:
    proc = await asyncio.create_subprocess_exec(*hpcgate_cmd("up", *args), env=env, cwd=cwd,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    run = Up(proc)
    try:
        yield run
    finally:
        if proc.returncode is None:  # a failed test: stop it (a second signal: at once)
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await run.finish(60)
            await run.kill()


def _env(up_db: str, redis_prefix: str, **extra: str) -> dict[str, str]:
    """The test's database and Redis prefix; instance ports of a block of its own (other test
    runs share this machine and its default range)."""
    base = random.randrange(21000, 29000, 100)
    return child_env(HPCGATE_DATABASE_URL=up_db, HPCGATE_REDIS_PREFIX=f"{redis_prefix}{unique_name('lc')}:",
                     HPCGATE_API_PORT_RANGE_START=str(base), HPCGATE_API_PORT_RANGE_END=str(base + 99),
                     **extra)


def _args(data_dir: Path, gateway_port: int, api_port: int, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--gateway-port", str(gateway_port), "--api-port", str(api_port),
            "--instances", "1", *extra]


def _gone(pid: int, start: int) -> bool:
    return proc_start(pid) != start


async def _jobs(dsn: str) -> list[tuple[str, str, str | None]]:
    """(launcher, state, reason) of every job row, oldest first."""
    conn = await asyncpg.connect(dsn)
    try:
        return [(r["launcher"], r["state"], r["state_reason"]) for r in await conn.fetch(
            "SELECT launcher, state, state_reason FROM ai_model_endpoint_jobs ORDER BY endpoint_job_id")]
    finally:
        await conn.close()


def _local_job_pids(data_dir: Path) -> list[tuple[int, int]]:
    """(pid, start time) of the local launcher's jobs (their wrappers lead the process groups)."""
    found = []
    for path in (data_dir / "jobs" / "local-state").glob("*.json"):
        rec = json.loads(path.read_text())
        if rec["pid"]:
            found.append((rec["pid"], rec["proc_start"]))
    return found


async def _squeue(prefix: str) -> str:
    """The local Slurm cluster's queue: one "name state" line per job of this test's prefix."""
    slurm = await asyncio.to_thread(start_slurm)
    squeue = await asyncio.create_subprocess_exec(
        "squeue", "--noheader", "--format=%j %T", env={**child_env(), **slurm},
        stdout=asyncio.subprocess.PIPE)
    lines = (await squeue.communicate())[0].decode().splitlines(True)
    return "".join(line for line in lines if prefix in line)


async def test_sigkill_of_up_ends_its_slurm_job_then_the_next_up_cleans_up_and_drains_on_ctrl_c(
        up_db: str, redis_prefix: str, tmp_path: Path) -> None:
    prefix = f"lc{unique_name('')[-8:]}"  # Slurm is shared by test sessions: our jobs only
    env = _env(up_db, redis_prefix, HPCGATE_UP_MODEL="lc-demo", HPCGATE_UP_TENANT="lc-demo",
               HPCGATE_UP_STOP_GRACE_S="1", HPCGATE_JOBS_JOB_NAME_PREFIX=prefix)
    data_dir, other_dir = tmp_path / "a", tmp_path / "b"
    gw, api = _free_port(), _free_port()
    async with up(env, tmp_path, *_args(data_dir, gw, api, "--launcher", "slurm")) as first:
        await first.until("Ctrl-C stops everything")
        record = json.loads((data_dir / "run.json").read_text())
        daemons = [(c["pid"], c["start"]) for c in record["children"]]
        names = {c["name"] for c in record["children"]}
        assert {"control-api", "gateway"} <= names and len(daemons) == len(names) >= 4, record
        assert " RUNNING" in await _squeue(prefix)

        # A second up on the same database, with another data dir and ports: refused, naming the first.
        async with up(env, tmp_path, *_args(other_dir, _free_port(), _free_port())) as second:
            assert await second.finish(30) == 1
        assert f"another hpcgate up uses database '{up_db.rsplit('/', 1)[1]}': hpcgate-up pid " \
               f"{first.proc.pid}" in second.text, second.text
        assert not (other_dir / "logs").exists()

        await first.kill()  # SIGKILL: no cleanup of its own
        await wait_until(lambda: all(_gone(*p) for p in daemons), 20, "the daemons to end with hpcgate up")

        async def slurm_job_ended() -> bool:
            return await _squeue(prefix) == ""

        # the Job Worker, stopped by the parent-death signal, cancelled the Slurm job on its way out
        await wait_until(slurm_job_ended, 30, "the Slurm job to end with hpcgate up")
        assert '"event":"jobs_ended_with_parent"' in (data_dir / "logs" / "control-jobs.log").read_text()

    old_gateway_log = (data_dir / "logs" / "gateway.log").read_text()
    async with up(env, tmp_path, *_args(data_dir, gw, api)) as third:
        key = (await third.until(r"API key     : (hpg_\S+)")).group(1)
        await third.until("Ctrl-C stops everything", 5)
        assert re.search(r"ending 1 instance\(s\) of the slurm launcher: job \d+ of 'lc-demo'", third.text), \
            third.text
        assert (data_dir / "logs" / "gateway.log.1").read_text() == old_gateway_log
        assert old_gateway_log not in (data_dir / "logs" / "gateway.log").read_text()
        jobs = await _jobs(up_db)
        assert [j[:2] for j in jobs] == [("slurm", "ended"), ("local", "ready")], jobs
        instances = _local_job_pids(data_dir)
        assert len(instances) == 1, instances

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw}/v1", api_key=key, max_retries=0)
        stream = await client.chat.completions.create(
            model="lc-demo", messages=[{"role": "user", "content": "x"}], max_tokens=30_000, stream=True,
            extra_body={"ignore_eos": True})
        await stream.__anext__()  # a long stream is in flight
        third.proc.send_signal(signal.SIGINT)
        assert await third.finish(60) == 0, third.text
        with contextlib.suppress(openai.APIError):
            async for _ in stream:  # it ends (cut): the instance is gone
                pass
        await client.close()
    assert re.search(r"draining: job \d+ of 'lc-demo' \(local local-", third.text), third.text
    assert re.search(r"ending 1 instance\(s\) of the local launcher", third.text), third.text
    assert all(_gone(*p) for p in instances)
    assert {j[1] for j in await _jobs(up_db)} == {"ended"}
    redis = aioredis.from_url(REDIS_URL)
    try:  # a clean stop gives the Redis prefix up at once (another stack may take it)
        assert await redis.get(f"{env['HPCGATE_REDIS_PREFIX']}owner") is None
    finally:
        await redis.aclose()


def _template_dir(tmp_path: Path, body: str) -> Path:
    """A site template named "sim" (found before slurm/templates) whose job runs ``body``."""
    directory = tmp_path / "templates"
    directory.mkdir()
    (directory / "sim.sbatch").write_text("#!/bin/bash\n{{sbatch}}\nset -euo pipefail\n" + body + "\n")
    return directory


async def test_a_failed_model_ends_the_wait_with_the_reason_from_the_job_output(
        up_db: str, redis_prefix: str, tmp_path: Path) -> None:
    templates = _template_dir(tmp_path, 'echo "engine exploded: CUDA out of memory" >&2\nexit 3')
    env = _env(up_db, redis_prefix, HPCGATE_JOBS_TEMPLATE_DIRS=str(templates), HPCGATE_JOBS_MAX_FAILURES="1")
    async with up(env, tmp_path, *_args(tmp_path / "up", _free_port(), _free_port())) as run:
        assert await run.finish(90) == 1
    assert re.search(r"error: model 'demo' failed: .*exit code 3.*engine exploded: CUDA out of memory",
                     run.text), run.text


async def test_ctrl_c_while_starting_or_waiting_for_the_model_stops_at_once_and_ends_the_job(
        up_db: str, redis_prefix: str, tmp_path: Path) -> None:
    templates = _template_dir(tmp_path, "sleep 600")  # never registers
    env = _env(up_db, redis_prefix, HPCGATE_JOBS_TEMPLATE_DIRS=str(templates))
    data_dir = tmp_path / "up"
    # While the daemons start: at once, and none of them is left.
    async with up(env, tmp_path, *_args(data_dir, _free_port(), _free_port())) as run:
        await run.until("starting control api")
        run.proc.send_signal(signal.SIGINT)
        assert await run.finish(30) == 130, run.text
    assert "interrupted" in run.text
    assert not (data_dir / "run.json").exists()  # a clean stop: nothing for the next run to clear
    async with up(env, tmp_path, *_args(data_dir, _free_port(), _free_port())) as run:
        await run.until(r"model 'demo': (not yet published|starting|pending|unavailable)")
        await wait_until(lambda: bool(_local_job_pids(data_dir)), 30, "the job to start")
        jobs = _local_job_pids(data_dir)
        run.proc.send_signal(signal.SIGINT)
        assert await run.finish(30) == 130, run.text
    assert "interrupted while starting" in run.text
    assert all(_gone(*p) for p in jobs)
    assert {j[1] for j in await _jobs(up_db)} == {"ended"}
