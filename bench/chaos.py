"""``hpcgate bench chaos``: the whole stack under mixed load while faults are injected, judged.

One run: a private PostgreSQL and Redis, the control api, Endpoint Worker, Job Worker (local
launcher, simulated instances) and a gateway with several workers (:mod:`bench.chaos_stack`);
``concurrency`` clients sending streaming and non-streaming chat, completions and embeddings
for several tenants (:mod:`bench.chaos_load`); and the fault schedule, one fault at a time:

========================  =================================================================
``kill_instance``         SIGKILL a ready model instance; the Job Worker must replace it
``kill_gateway_worker``   SIGKILL one gateway worker; its parent restarts it
``restart_redis``         stop Redis (every key is lost), start it again after ``down_s``
``restart_postgres``      stop PostgreSQL as a crash would (immediate shutdown), start it after ``down_s``
``kill_endpoint_worker``  SIGKILL ``control health``; a new one is started (as Kubernetes would)
``kill_job_worker``       SIGKILL ``control jobs``; a new one is started and adopts the jobs
``stall_instance``        SIGSTOP a ready instance (it reads and answers nothing) for ``stall_s``
``kill_gateway_worker_redis_down``  both at once: Redis stopped, a gateway worker SIGKILLed and
                          restarted, Redis started ``down_s`` later
========================  =================================================================

After each fault the run waits until the stack has recovered (the fault's own condition, e.g.
the model back at its desired ready instances), records how long that took, lets the load run
``gap_s`` more, and goes on. At the end the load stops, the usage is flushed, and
:func:`bench.chaos_plan.build_report` judges everything; the table is printed, the JSON written,
and the exit status is 1 when an invariant was broken. ``--quick`` (one pass, about a minute)
runs in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from bench.chaos_load import MODEL, Load
from bench.chaos_plan import (
    PROFILES,
    Fault,
    Outcome,
    Profile,
    Resources,
    build_report,
    expected_usage,
    format_table,
    parse_faults,
    progress_line,
    schedule,
)
from bench.chaos_stack import ChaosStack, StackError
from hpcgate.schemas import RedisNames
from hpcgate.supervisor import ChildFailedError

FLUSH_S = 0.25  # the gateway's usage flush interval in the run
TIMEOUT_S = 30.0  # a request without its end after this long hangs (the gateway's upstream
# read timeout is 3 s in the run, so nothing may legitimately take this long)
MIB = 1024 * 1024


class Chaos:
    def __init__(self, profile: Profile, kinds: tuple[str, ...], say: Callable[[str], None]) -> None:
        self.profile = profile
        self.kinds = kinds
        self.say = say
        self.root = Path(tempfile.mkdtemp(prefix="hpcgate-chaos-"))
        self.stack = ChaosStack(self.root, instances=profile.instances,
                                gateway_workers=profile.gateway_workers, flush_s=FLUSH_S)
        self.rng = random.Random(0)
        self.t0 = 0.0
        self.timeline: list[tuple[float, int]] = []
        self.disabled: set[int] = set()  # ports of instances this run killed or stopped
        self.last_ports: list[int] = []
        self.killed_jobs: list[int] = []
        self.resources = Resources()
        self.faults: list[Fault] = []
        self._struck_at = 0.0
        self.load: Load | None = None
        self._samplers: list[asyncio.Task[None]] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- samplers ------------------------------------------------------------------------------
    def _note_ready(self) -> None:
        self.timeline.append((self.now(), len([p for p in self.last_ports if p not in self.disabled])))

    async def _sample_ready(self) -> None:
        while True:
            ports = await self.stack.ready_ports()
            if ports is not None:  # while PostgreSQL is away the last known state stands
                self.last_ports = ports
            self._note_ready()
            await asyncio.sleep(0.25)

    def _gateway_resources(self) -> tuple[float, int]:
        rss, fds = 0, 0
        for p in self.stack.gateway_tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                rss += p.memory_info().rss
                fds += p.num_fds()
        return rss / MIB, fds

    async def _sample_resources(self) -> None:
        while True:
            rss, fds = self._gateway_resources()
            self.resources.rss_mib.append(round(rss, 1))
            self.resources.fds.append(fds)
            await asyncio.sleep(1.0)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            phase = f"after {self.faults[-1].kind}" if self.faults else "load, no fault yet"
            self.say(progress_line(self.now(), phase, self.load.outcomes if self.load else []))

    # -- faults --------------------------------------------------------------------------------
    async def _until(self, cond: Callable[[], Awaitable[bool]], since: float) -> float | None:
        deadline = time.monotonic() + self.profile.recover_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, StackError, psutil.Error):
                if await cond():
                    return self.now() - since
            await asyncio.sleep(0.1)
        return None

    async def _instances_back(self) -> bool:
        ports = await self.stack.ready_ports()
        live = [p for p in ports or [] if p not in self.disabled]
        return ports is not None and len(live) >= self.profile.instances

    async def _pick_instance(self) -> tuple[int, psutil.Process, list[int]]:
        """A ready instance of this run: its port, process and job row id(s)."""
        procs = self.stack.instances_by_port()
        ready = await self.stack.ready_ports() or []
        ports = sorted(p for p in ready if p in procs and p not in self.disabled)
        if not ports:
            raise StackError("no ready instance to break")
        port = self.rng.choice(ports)
        rows = await self.stack.sql("SELECT endpoint_job_id FROM ai_model_endpoints WHERE port = $1", port)
        return port, procs[port], [int(r["endpoint_job_id"]) for r in rows]

    async def kill_instance(self, at: float) -> tuple[str, float | None]:
        port, proc, jobs = await self._pick_instance()
        self.killed_jobs += jobs  # must be over at the end, and replaced
        self.disabled.add(port)
        proc.send_signal(signal.SIGKILL)
        self._note_ready()
        return f"port {port}", await self._until(self._instances_back, at)

    async def stall_instance(self, at: float) -> tuple[str, float | None]:
        port, proc, _ = await self._pick_instance()  # it may come back: it need not be replaced
        self.disabled.add(port)
        proc.send_signal(signal.SIGSTOP)
        self._note_ready()
        await asyncio.sleep(self.profile.stall_s)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGCONT)
        self.disabled.discard(port)
        return f"port {port} stopped {self.profile.stall_s:.0f}s", await self._until(self._instances_back, at)

    async def kill_gateway_worker(self, at: float) -> tuple[str, float | None]:
        workers = self.stack.gateway_tree()[1:]
        victim = self.rng.choice(workers)
        self._struck_at = self.now()  # the report's time of this fault: when the worker died
        victim.send_signal(signal.SIGKILL)

        async def restarted() -> bool:
            pids = [p.pid for p in self.stack.gateway_tree()[1:] if p.status() != psutil.STATUS_ZOMBIE]
            return len(pids) == self.profile.gateway_workers and victim.pid not in pids

        return f"pid {victim.pid}", await self._until(restarted, at)

    async def _tables_republished(self) -> bool:
        names = RedisNames("chaos:")
        client = aioredis.from_url(self.stack.redis.url, socket_connect_timeout=1)
        try:
            return bool(await client.exists(names.endpoint_table, names.key_table) == 2)
        except aioredis.RedisError:
            return False
        finally:
            await client.aclose()

    async def restart_redis(self, at: float) -> tuple[str, float | None]:
        await self.stack.redis.stop()
        await asyncio.sleep(self.profile.down_s)
        await self.stack.redis.start()
        return (f"down {self.profile.down_s:.0f}s, tables republished",
                await self._until(self._tables_republished, at))

    async def kill_gateway_worker_redis_down(self, at: float) -> tuple[str, float | None]:
        """Two faults at once: a gateway worker restarted while Redis is away must not answer
        for want of tables while the other workers hold them."""
        await self.stack.redis.stop()
        detail, restarted = await self.kill_gateway_worker(at)
        await asyncio.sleep(self.profile.down_s)
        await self.stack.redis.start()
        if restarted is None:
            return f"{detail} not restarted", None
        return (f"{detail}, Redis down {self.now() - at:.0f}s",
                await self._until(self._tables_republished, at))

    async def restart_postgres(self, at: float) -> tuple[str, float | None]:
        await self.stack.pg.stop(crash=True)
        await asyncio.sleep(self.profile.down_s)
        await self.stack.pg.start()

        async def serving() -> bool:
            await self.stack.admin("GET", "/admin/models")
            return await self._instances_back()

        return f"crashed, down {self.profile.down_s:.0f}s", await self._until(serving, at)

    async def _kill_daemon(self, name: str, at: float) -> tuple[str, float | None]:
        child = self.stack.daemon(name)
        assert child.proc is not None
        child.proc.send_signal(signal.SIGKILL)
        await child.proc.wait()
        try:  # what a process supervisor (Kubernetes, systemd) does: start a new one
            await self.stack.start_daemon(name)
        except ChildFailedError as exc:
            return f"not restarted: {exc}", None
        return "restarted", self.now() - at

    async def kill_endpoint_worker(self, at: float) -> tuple[str, float | None]:
        return await self._kill_daemon("control-health", at)

    async def kill_job_worker(self, at: float) -> tuple[str, float | None]:
        return await self._kill_daemon("control-jobs", at)

    async def inject(self, kind: str) -> Fault:
        at = self._struck_at = self.now()
        self.say(progress_line(at, f"FAULT {kind}", self.load.outcomes if self.load else []))
        try:
            detail, recovery = await getattr(self, kind)(at)
        except StackError as exc:
            detail, recovery = f"could not inject: {exc}", None
        if recovery is not None:
            recovery -= self._struck_at - at
        at = self._struck_at
        self.say(f"{self.now():7.1f}s  {kind}: {detail}; recovered "
                 + ("NOT" if recovery is None else f"after {recovery:.1f}s"))
        return Fault(kind, at, recovery, detail)

    # -- the run -------------------------------------------------------------------------------
    async def _wait_ready(self, keys: dict[str, str]) -> None:
        """The model at its desired instances, and every tenant's key accepted by every worker:
        ``/v1/models`` (no usage recorded) on fresh connections, the model listed as ready."""
        if await self._until(self._instances_back, 0.0) is None:
            raise StackError(f"the model has no {self.profile.instances} ready instances after "
                             f"{self.profile.recover_timeout_s:.0f}s; see {self.root / 'logs'}")
        url = f"http://127.0.0.1:{self.stack.gateway_port}/v1/models"

        async def accepted() -> bool:
            fresh = httpx.Limits(max_keepalive_connections=0)  # each probe on a new connection
            async with httpx.AsyncClient(timeout=5, limits=fresh) as client:
                for key in keys.values():
                    for _ in range(4 * self.profile.gateway_workers):
                        r = await client.get(url, headers={"authorization": f"Bearer {key}"})
                        models = r.json().get("data", []) if r.status_code == 200 else []
                        if not any(m.get("id") == MODEL and m.get("state") == "ready" for m in models):
                            return False
            return True

        if await self._until(accepted, 0.0) is None:
            raise StackError("the gateway did not accept the tenants' keys")

    async def run(self) -> dict[str, object]:
        p = self.profile
        self.say(f"starting the stack in {self.root} ...")
        await self.stack.start()
        keys = await self.stack.setup(p.tenants)
        self.say(f"waiting for {p.instances} instances of the model ...")
        await self._wait_ready(keys)
        self.t0 = time.monotonic()
        _, self.resources.fds_idle_before = self._gateway_resources()
        self._samplers = [asyncio.create_task(c) for c in
                          (self._sample_ready(), self._sample_resources(), self._progress())]
        self.load = Load("127.0.0.1", self.stack.gateway_port, keys, p.concurrency, self.t0,
                         max_tokens=p.max_tokens, timeout_s=TIMEOUT_S)
        self.load.start()
        await asyncio.sleep(p.gap_s)
        passes = 0
        while schedule(self.kinds, self.now(), passes, p.duration_s):
            for kind in self.kinds:
                self.faults.append(await self.inject(kind))
                await asyncio.sleep(p.gap_s)
            passes += 1
        self.say(progress_line(self.now(), "stopping the load", self.load.outcomes))
        await self.load.stop()
        duration = self.now()
        jobs, job_problems = await self._jobs_settled()
        recorded = await self._usage_flushed(self.load.outcomes)
        await asyncio.sleep(1.0)  # closed connections are gone from the gateway's descriptors
        _, self.resources.fds_idle_after = self._gateway_resources()
        for task in self._samplers:
            task.cancel()
        return build_report(profile=p, outcomes=self.load.outcomes, faults=self.faults,
                            timeline=self.timeline, recorded=recorded,
                            resources=self.resources, jobs=jobs, job_problems=job_problems,
                            duration_s=duration)

    async def _usage(self) -> dict[str, tuple[int, int]] | None:
        try:
            rows = await self.stack.sql(
                """SELECT t.name, sum(u.prompt_tokens) AS p, sum(u.completion_tokens) AS c
                   FROM usage_records u JOIN identity_tenants t USING (tenant_id) GROUP BY t.name""")
        except Exception:
            return None
        return {r["name"]: (int(r["p"]), int(r["c"])) for r in rows}

    async def _usage_flushed(self, outcomes: list[Outcome]) -> dict[str, tuple[int, int]]:
        """PostgreSQL's usage once it matches what the clients received, or has stopped changing
        for a few flush intervals (then the difference is what the report shows)."""
        received = expected_usage(outcomes)
        last, stable_since = None, time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = await self._usage()
            if got == received:
                return got
            if got != last:
                last, stable_since = got, time.monotonic()
            elif got is not None and time.monotonic() - stable_since > 10 * FLUSH_S + 2:
                return got
            await asyncio.sleep(FLUSH_S)
        return last or {}

    async def _jobs_settled(self) -> tuple[dict[str, object], list[str]]:
        """Wait (bounded) for the desired instances, one process each, then check: no duplicate
        job, no orphaned process, every killed instance's job over."""
        state: dict[str, object] = {}
        problems: list[str] = []

        async def settled() -> bool:
            rows = await self.stack.sql(
                """SELECT j.endpoint_job_id, j.state, e.port FROM ai_model_endpoint_jobs j
                   LEFT JOIN ai_model_endpoints e USING (endpoint_job_id)
                   WHERE j.state NOT IN ('ended', 'failed')""")
            procs = self.stack.instances_by_port()
            live_ports = {r["port"] for r in rows if r["port"] is not None}
            killed_live = sorted({r["endpoint_job_id"] for r in rows} & set(self.killed_jobs))
            over = await self.stack.sql(
                """SELECT state, coalesce(state_reason, '') AS reason, count(*) AS n
                   FROM ai_model_endpoint_jobs WHERE state IN ('ended', 'failed')
                   GROUP BY 1, 2 ORDER BY 3 DESC""")
            state.update(live_jobs=len(rows), desired=self.profile.instances,
                         port_block=self.stack.port_block,
                         instance_processes=len(procs), killed_instances=len(self.killed_jobs),
                         states=sorted(r["state"] for r in rows),
                         ended=[f"{r['n']} {r['state']}: {r['reason'][-300:]}" for r in over])
            problems[:] = []
            if len(rows) != self.profile.instances:
                problems.append(f"{len(rows)} live jobs at the end, {self.profile.instances} desired")
            if set(procs) != live_ports:
                problems.append(f"instance processes on ports {sorted(procs)}, live jobs on "
                                f"{sorted(live_ports)} (orphaned or missing instances)")
            if killed_live:
                problems.append(f"killed instances' jobs still live: {killed_live}")
            if any(r["state"] != "ready" for r in rows):
                problems.append(f"live jobs not ready: {sorted(r['state'] for r in rows)}")
            return not problems

        await self._until(settled, self.now())
        return state, problems

    async def close(self, keep_logs: Path | None) -> None:
        for task in self._samplers:
            task.cancel()
        await self.stack.close()
        if keep_logs is not None:
            with contextlib.suppress(OSError):
                shutil.copytree(self.root / "logs", keep_logs, dirs_exist_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


def cmd_chaos(args: argparse.Namespace, results_dir: str) -> int:
    profile = PROFILES["quick" if args.quick else "full"]
    try:
        kinds = parse_faults(args.faults)
    except ValueError as exc:
        print(f"hpcgate bench chaos: error: --faults: {exc}", file=sys.stderr)
        return 2
    if args.duration is not None:
        if args.duration < 0:
            print("hpcgate bench chaos: error: --duration must be >= 0", file=sys.stderr)
            return 2
        profile = Profile(**{**profile.__dict__, "duration_s": args.duration})
    if args.concurrency is not None:
        if args.concurrency < 1:
            print("hpcgate bench chaos: error: --concurrency must be >= 1", file=sys.stderr)
            return 2
        profile = Profile(**{**profile.__dict__, "concurrency": args.concurrency})
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = Path(args.result_file or Path(results_dir) / f"chaos-{stamp}.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(line, flush=True)

    async def main() -> dict[str, object] | None:
        chaos = Chaos(profile, kinds, say)
        report: dict[str, object] | None = None
        try:
            report = await chaos.run()
        except (StackError, ChildFailedError, OSError) as exc:
            say(f"hpcgate bench chaos: error: {exc}")
        finally:
            broken = report is None or bool(report["violations"]) or args.keep_logs
            await chaos.close(path.with_suffix(".logs") if broken else None)
        return report

    report = asyncio.run(main())
    if report is None:
        print(f"logs: {path.with_suffix('.logs')}")
        return 1
    print(format_table(report))
    path.write_text(json.dumps(report, indent=1))
    print(f"results: {path}")
    if report["violations"]:
        print(f"logs: {path.with_suffix('.logs')}")
    return 1 if report["violations"] else 0

