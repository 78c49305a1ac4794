"""Token usage per tenant, model and minute, written to PostgreSQL in batches off the hot path.

The hot path only adds to an in-memory dict keyed by (tenant, model, minute bucket). A
background task swaps the dict out every ``usage_flush_s`` and upserts it with one
``executemany`` (``INSERT ... ON CONFLICT DO UPDATE SET x = usage_records.x + EXCLUDED.x``), so
concurrent gateways add up instead of overwriting. Invariants: a batch that fails to write is
merged back and retried (counts are never lost while PostgreSQL is down, only delayed); the
dict holds one row per tenant x model x minute, so it stays small; :meth:`close` writes what is
left (graceful shutdown). Anonymous requests (``--no-auth``, tenant 0) are not recorded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import asyncpg

from hpcgate.logs import get_logger

log = get_logger("hpcgate.gateway.usage")

UPSERT = """
INSERT INTO usage_records (tenant_id, model, bucket_start, requests, errors, prompt_tokens, completion_tokens)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (tenant_id, model, bucket_start) DO UPDATE SET
    requests = usage_records.requests + EXCLUDED.requests,
    errors = usage_records.errors + EXCLUDED.errors,
    prompt_tokens = usage_records.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = usage_records.completion_tokens + EXCLUDED.completion_tokens
"""

Key = tuple[int, str, int]  # tenant_id, model, bucket start (unix minute * 60)


class UsageRecorder:
    def __init__(self, dsn: str | None, flush_s: float) -> None:
        self._dsn = dsn
        self._flush_s = flush_s
        self._rows: dict[Key, list[int]] = {}
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._writing = 0

    def add(
        self, tenant_id: int, model: str, now_unix: float, *, ok: bool, prompt: int, completion: int
    ) -> None:
        if tenant_id == 0 or self._dsn is None:
            return
        key = (tenant_id, model, int(now_unix) // 60 * 60)
        row = self._rows.get(key)
        if row is None:
            self._rows[key] = [1, 0 if ok else 1, prompt, completion]
        else:
            row[0] += 1
            row[1] += 0 if ok else 1
            row[2] += prompt
            row[3] += completion

    def unflushed_tokens(self) -> dict[int, int]:
        """Tokens per tenant not written yet (a batch being written counts as written)."""
        out: dict[int, int] = {}
        for (tenant, _, _), row in self._rows.items():
            out[tenant] = out.get(tenant, 0) + row[2] + row[3]
        return out

    @property
    def pending(self) -> int:
        """Rows not yet known to be written (including a batch being written now)."""
        return len(self._rows) + self._writing

    def start(self) -> None:
        if self._dsn is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> bool:
        """Write what has accumulated; True if nothing is left unwritten."""
        async with self._lock:
            if not self._rows:
                return True
            rows, self._rows = self._rows, {}
            self._writing = len(rows)
            args = [
                (t, m, dt.datetime.fromtimestamp(b, dt.UTC), r[0], r[1], r[2], r[3])
                for (t, m, b), r in rows.items()
            ]
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self._dsn, timeout=5)
                await self._conn.executemany(UPSERT, args, timeout=10)
                return True
            except BaseException as exc:  # asyncpg raises many types, and we may be cancelled: keep the rows
                self._merge_back(rows)
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                if not isinstance(exc, Exception):
                    raise
                log.warning("usage_flush_failed", rows=len(args), error=str(exc) or type(exc).__name__)
                return False
            finally:
                self._writing = 0

    def _merge_back(self, rows: dict[Key, list[int]]) -> None:
        for key, row in rows.items():  # nothing is lost, only delayed
            cur = self._rows.get(key)
            if cur is None:
                self._rows[key] = row
            else:
                for i in range(4):
                    cur[i] += row[i]

    async def close(self, timeout: float = 10.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = asyncio.get_running_loop().time() + timeout
        while self._rows and asyncio.get_running_loop().time() < deadline:
            if not await self.flush():
                await asyncio.sleep(0.5)
        if self._rows:
            log.error("usage_lost_on_shutdown", rows=len(self._rows))
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
