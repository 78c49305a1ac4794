"""``hpcgate control batches``: runs batch lines through the gateway, as backfill.

State lives in PostgreSQL, so any number of runners may run and any may die:
- a line is claimed with ``FOR UPDATE SKIP LOCKED`` and a lease (renewed while its request
  runs); a line whose lease ran out (its runner died) is claimed again by anyone;
- a result is stored with its line in one transaction that also bumps the batch's counters,
  and only by the claim that holds the line, so each line is written exactly once even when a
  request was sent twice (a crash between the engine's answer and the commit);
- whole-batch steps (validation, finalising) are in :mod:`control.batch.finalize`.

Requests go through the gateway (same routing, retries, ejection and per-tenant usage as
interactive ones) with the internal token and the tenant's id, which mark them as batch
traffic: the gateway admits them behind interactive requests. Per model, a :class:`Pacer`
sets how many lines are in flight from the engines' scraped queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import httpx
import msgspec

from control.batch import finalize, results
from control.batch.filestore import FileStore
from control.batch.http1 import Http1Client, Http1Error
from control.batch.metrics import serve_metrics
from control.batch.pacing import Pacer
from control.settings import BatchRunnerSettings
from hpcgate.backoff import Backoff
from hpcgate.logs import get_logger
from hpcgate.metrics_text import EngineLoad, parse_engine_load

log = get_logger("hpcgate.control.batches")

_CLAIM = """
WITH c AS (
    SELECT l.batch_id, l.line_no FROM batch_lines l JOIN batches b USING (batch_id)
     WHERE b.status = 'in_progress' AND l.model = $1
       AND (l.state = 'pending' OR (l.state = 'claimed' AND l.lease_until < now()))
     ORDER BY b.seq, l.line_no LIMIT $2
     FOR UPDATE OF l SKIP LOCKED)
UPDATE batch_lines l SET state = 'claimed', claim = gen_random_uuid(),
                         lease_until = now() + make_interval(secs => $3)
  FROM c, batches b
 WHERE l.batch_id = c.batch_id AND l.line_no = c.line_no AND b.batch_id = l.batch_id
RETURNING l.batch_id, l.line_no, l.custom_id, l.byte_offset, l.byte_length, l.claim,
          b.tenant_id, b.endpoint, b.input_file_id"""

_BACKLOG = """SELECT l.model, count(*) AS n FROM batch_lines l JOIN batches b USING (batch_id)
               WHERE b.status = 'in_progress' AND l.state <> 'done' GROUP BY l.model"""

_ENGINES = """SELECT c.name, e.node, e.port FROM ai_model_endpoints e
                JOIN ai_model_configurations c USING (model_id)
               WHERE e.ready_at IS NOT NULL AND NOT e.draining"""

WRITE_BATCH = 500  # results per transaction at most
CLEANUP_EVERY_S = 60.0  # expired files are looked for this often
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class _Body(msgspec.Struct):
    body: msgspec.Raw


_decode_body = msgspec.json.Decoder(_Body).decode


class Claim(msgspec.Struct, frozen=True):
    batch_id: str
    line_no: int
    custom_id: str
    offset: int
    length: int
    claim: UUID
    tenant_id: int
    endpoint: str
    input_file_id: str
    model: str


class BatchRunner:
    def __init__(
        self,
        settings: BatchRunnerSettings,
        pool: asyncpg.Pool,
        client: httpx.AsyncClient,
        runner_id: str | None = None,
    ) -> None:
        self.s = settings
        self.pool = pool
        self.client = client  # the engines' /metrics (once per control step)
        gateway = urlsplit(settings.gateway_url)
        self.gateway = Http1Client(gateway.hostname or "127.0.0.1", gateway.port or 80)  # batch requests
        self._path_prefix = gateway.path.rstrip("/")
        self.files = FileStore(settings.batch_dir)
        self.runner_id = runner_id or f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"
        self.pacers: dict[str, Pacer] = {}
        self.inflight: dict[str, int] = {}
        self.pushed_back: set[str] = set()
        self.backlog: dict[str, int] = {}
        self.claims: dict[UUID, Claim] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.running: dict[UUID, asyncio.Task[None]] = {}
        self._next_cleanup = 0.0
        self._pending: list[tuple[Claim, results.LineResult, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.done_lines = 0
        self.failed_lines = 0
        self._wake = asyncio.Event()
        self._stopping = False

    # -- the loops -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        log.info("batch_runner_started", runner=self.runner_id)
        helpers = [asyncio.create_task(self._renew_leases(), name="renew_leases"),
                   asyncio.create_task(self._pace(), name="pace")]
        try:
            while not stop.is_set():
                for helper in helpers:  # they heal outages and never return: one that ended failed
                    if helper.done() and not helper.cancelled() and (failure := helper.exception()):
                        log.error("batch_runner_helper_failed", helper=helper.get_name(),
                                  error=repr(failure)[:500])
                        raise failure  # the runner exits for its supervisor, rather than run on without it
                try:
                    await self.tick()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("batch_runner_error", error=repr(exc))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.s.poll_s):
                        stop_wait = asyncio.ensure_future(stop.wait())
                        wake_wait = asyncio.ensure_future(self._wake.wait())
                        try:
                            await asyncio.wait({stop_wait, wake_wait}, return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            stop_wait.cancel()
                            wake_wait.cancel()
        finally:
            self._stopping = True
            if self.tasks:  # let lines in flight finish (their results are written), up to the grace
                await asyncio.wait(self.tasks, timeout=self.s.cancel_grace_s)
            for t in (*helpers, *self.tasks):
                t.cancel()
            await asyncio.gather(*helpers, *self.tasks, return_exceptions=True)
            if self._writer is not None:  # results already handed to the writer are stored
                await asyncio.gather(self._writer, return_exceptions=True)
            self.gateway.close()
            log.info("batch_runner_stopped", runner=self.runner_id)

    async def tick(self) -> None:
        """One pass: whole-batch steps, then claim lines up to each model's limit."""
        s = self.s
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await finalize.validate_next(conn, self.files, max_lines=s.max_lines, max_errors=s.max_errors)
            async with conn.transaction():
                await finalize.advance(conn)
            async with conn.transaction():
                await finalize.finalize_next(
                    conn, self.files, grace_s=s.cancel_grace_s, retention_s=s.files_retention_s
                )
            if time.monotonic() >= self._next_cleanup:
                self._next_cleanup = time.monotonic() + CLEANUP_EVERY_S
                async with conn.transaction():
                    await finalize.expire_files(conn, self.files)
            await self._abandon_finished(conn)
            self.backlog = {r["model"]: r["n"] for r in await conn.fetch(_BACKLOG)}
            for model in self.backlog:
                pacer = self.pacers.get(model)
                if pacer is None:
                    pacer = self.pacers[model] = Pacer(s.min_concurrency, s.max_concurrency,
                                                       s.contention_steps)
                room = pacer.limit - self.inflight.get(model, 0)
                if room <= 0 or self._stopping:
                    continue
                for r in await conn.fetch(_CLAIM, model, room, s.lease_s):
                    self._start(
                        Claim(
                            r["batch_id"],
                            r["line_no"],
                            r["custom_id"],
                            r["byte_offset"],
                            r["byte_length"],
                            r["claim"],
                            r["tenant_id"],
                            r["endpoint"],
                            r["input_file_id"],
                            model,
                        )
                    )

    async def _abandon_finished(self, conn: Any) -> None:
        """Lines in flight of a batch that was finalised meanwhile (cancelled or expired, past the
        grace period): their results would be refused; stop their requests (the gateway then
        aborts them at the engine)."""
        if not self.running:
            return
        batch_ids = list({c.batch_id for c in self.claims.values()})
        rows = await conn.fetch(
            """SELECT batch_id FROM batches WHERE batch_id = ANY($1::text[])
                AND status NOT IN ('in_progress', 'cancelling', 'finalizing')""",
            batch_ids,
        )
        final = {r["batch_id"] for r in rows}
        for claim, task in list(self.running.items()):
            c = self.claims.get(claim)
            if c is not None and c.batch_id in final:
                task.cancel()

    def _start(self, c: Claim) -> None:
        self.claims[c.claim] = c
        self.inflight[c.model] = self.inflight.get(c.model, 0) + 1
        task = asyncio.create_task(self._run_line(c))
        self.running[c.claim] = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.s.lease_s / 3)
            if not self.claims:
                continue
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        """UPDATE batch_lines SET lease_until = now() + make_interval(secs => $2)
                            WHERE claim = ANY($1::uuid[]) AND state = 'claimed'""",
                        list(self.claims),
                        self.s.lease_s,
                    )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("batch_lease_renewal_failed", error=repr(exc))

    async def _pace(self) -> None:
        """Each control step: the engines' waiting requests per model -> each model's limit."""
        while True:
            await asyncio.sleep(self.s.control_step_s)
            loads = await self._scrape_loads() if self.pacers else {}
            for model, pacer in self.pacers.items():
                old = pacer.limit
                load = loads.get(model)
                # Requests arriving between two engine steps are "waiting" until the next one: a
                # few waiting is the engine's own rhythm; more than a share of those running is a
                # queue that interactive requests would wait in.
                excess = None if load is None else load[1] - max(1.0, self.s.waiting_tolerance * load[0])
                pacer.step(excess, model in self.pushed_back, self.inflight.get(model, 0))
                if pacer.limit != old:
                    log.debug("batch_concurrency", model=model, old=old, new=pacer.limit)
            self.pushed_back.clear()
            self._wake.set()

    async def _scrape_loads(self) -> dict[str, tuple[float, float]]:
        """(running, waiting) per model, summed over the model's ready endpoints."""
        try:
            async with self.pool.acquire() as conn:
                engines = await conn.fetch(_ENGINES)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return {}

        async def one(name: str, url: str) -> tuple[str, EngineLoad | None]:
            try:
                r = await self.client.get(url, timeout=1.0)
                return name, parse_engine_load(r.content)
            except httpx.HTTPError:
                return name, None

        found = await asyncio.gather(
            *(
                one(e["name"], f"http://{e['node']}:{e['port']}/metrics")
                for e in engines
                if e["name"] in self.pacers
            )
        )
        loads: dict[str, tuple[float, float]] = {}
        for name, load in found:
            if load is not None and load.waiting is not None:
                running, waiting = loads.get(name, (0.0, 0.0))
                loads[name] = (running + (load.running or 0.0), waiting + load.waiting)
        return loads

    # -- one line --------------------------------------------------------------------------------
    async def _run_line(self, c: Claim) -> None:
        try:
            result = await self._execute(c)
            await self._record(c, result)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch_line_failed", batch_id=c.batch_id, line=c.line_no)
        finally:
            self.claims.pop(c.claim, None)
            self.running.pop(c.claim, None)
            self.inflight[c.model] -= 1
            self._wake.set()

    def _read_body(self, c: Claim) -> bytes:
        with self.files.open(c.tenant_id, c.input_file_id) as fh:
            fh.seek(c.offset)
            return bytes(_decode_body(fh.read(c.length)).body)

    async def _execute(self, c: Claim) -> results.LineResult:
        lid = finalize.line_id(c.batch_id, c.line_no)
        try:
            body = self._read_body(c)
        except (OSError, msgspec.DecodeError) as exc:
            return results.unanswered(
                lid, c.custom_id, "invalid_file", f"the input line cannot be read: {exc}"
            )
        headers = {
            "content-type": "application/json",
            "x-request-id": lid.replace("_", "-"),  # the gateway takes [A-Za-z0-9._:-] ids
            "x-hpcgate-internal-token": self.s.internal_token,
            "x-hpcgate-tenant-id": str(c.tenant_id),
        }
        path = self._path_prefix + c.endpoint
        backoff = Backoff(0.5, 10.0)
        last: results.LineResult | None = None
        for attempt in range(self.s.max_attempts):
            if attempt:
                await asyncio.sleep(backoff.next_delay())
            try:
                status, answer_headers, answer = await self.gateway.post(
                    path, body, headers, timeout=self.s.request_timeout_s)
            except Http1Error as exc:
                last = results.unanswered(lid, c.custom_id, "request_failed", f"no answer: {exc}")
                continue
            rid = answer_headers.get(b"x-request-id", b"").decode("latin-1") or lid
            last = results.answered(lid, c.custom_id, status, rid, answer)
            if status not in _RETRY_STATUS:
                break
            if status in (429, 503):
                self.pushed_back.add(c.model)
        assert last is not None
        return last

    async def _record(self, c: Claim, res: results.LineResult) -> None:
        """Store the result, if this claim still holds the line and the batch is not final.

        Group commit: results that finish while a write is in progress are written together by
        the next one (one transaction for many lines instead of one per line); each waits for
        the transaction that holds it."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((c, res, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        if await done:
            if res.ok:
                self.done_lines += 1
            else:
                self.failed_lines += 1

    async def _write_pending(self) -> None:
        while self._pending:
            items, self._pending = self._pending[:WRITE_BATCH], self._pending[WRITE_BATCH:]
            try:
                stored = await self._store(items)
            except Exception as exc:  # the lines stay claimed; their lease runs out, they run again
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for c, _, fut in items:
                if not fut.done():
                    fut.set_result(c.claim in stored)

    async def _store(self, items: list[tuple[Claim, results.LineResult, asyncio.Future[bool]]]) -> set[UUID]:
        """One transaction: lock the batches that are still live (in batch id order, so two
        runners cannot deadlock), store the lines this runner still holds, add their counts."""
        async with self.pool.acquire() as conn, conn.transaction():
            live = {r["batch_id"] for r in await conn.fetch(
                """SELECT batch_id FROM batches
                    WHERE batch_id = ANY($1::text[]) AND status IN ('in_progress', 'cancelling', 'finalizing')
                    ORDER BY batch_id FOR NO KEY UPDATE""",
                list({c.batch_id for c, _, _ in items}))}
            mine = [(c, r) for c, r, _ in items if c.batch_id in live]
            if not mine:
                return set()
            rows = await conn.fetch(
                """UPDATE batch_lines l SET state = 'done', ok = u.ok, result = u.result, lease_until = NULL,
                          done_by = $6
                     FROM unnest($1::text[], $2::int[], $3::uuid[], $4::bool[], $5::bytea[])
                          AS u(batch_id, line_no, claim, ok, result)
                    WHERE l.batch_id = u.batch_id AND l.line_no = u.line_no AND l.claim = u.claim
                      AND l.state = 'claimed'
                RETURNING l.claim""",
                [c.batch_id for c, _ in mine], [c.line_no for c, _ in mine], [c.claim for c, _ in mine],
                [r.ok for _, r in mine], [r.line for _, r in mine], self.runner_id)
            stored = {r["claim"] for r in rows}  # a line another runner took over is not among them
            counts: dict[str, list[int]] = {}
            for c, r in mine:
                if c.claim in stored:
                    k = counts.setdefault(c.batch_id, [0, 0, 0, 0])
                    k[0 if r.ok else 1] += 1
                    k[2] += r.prompt_tokens
                    k[3] += r.completion_tokens
            if counts:
                ids = sorted(counts)
                await conn.execute(
                    """UPDATE batches b SET completed = b.completed + d.ok, failed = b.failed + d.bad,
                              prompt_tokens = b.prompt_tokens + d.p,
                              completion_tokens = b.completion_tokens + d.c
                         FROM unnest($1::text[], $2::int[], $3::int[], $4::bigint[], $5::bigint[])
                              AS d(batch_id, ok, bad, p, c)
                        WHERE b.batch_id = d.batch_id""",
                    ids, *([counts[i][k] for i in ids] for k in range(4)))
            return stored


async def serve(settings: BatchRunnerSettings, stop: asyncio.Event) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per batch request
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=settings.db_pool_size)
    async with httpx.AsyncClient(timeout=settings.request_timeout_s) as client:
        runner = BatchRunner(settings, pool, client)
        if settings.metrics_port:
            serve_metrics(runner, settings.metrics_host, settings.metrics_port)
        try:
            await runner.run(stop)
        finally:
            await pool.close()
