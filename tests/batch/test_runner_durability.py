"""The runner as a real process: killed with SIGKILL mid-batch and restarted, and two runners
sharing one batch. Every line must end up exactly once in the output file. And a runner whose
helper loop fails ends with the reason."""

from __future__ import annotations

import asyncio
import json
import logging

import asyncpg
import httpx
import openai
import pytest

from control.batch.runner import BatchRunner
from tests.batch.conftest import BatchStack, chat_line, jsonl
from tests.support.procs import wait_until


async def _batch(stack: BatchStack, tenant: str, n: int) -> tuple[openai.AsyncOpenAI, str]:
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=await stack.tenant(tenant), max_retries=0)
    data = jsonl([chat_line(f"k{i}", max_tokens=8) for i in range(n)])
    f = await client.files.create(file=("k.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    return client, batch.id


async def _completed(client: openai.AsyncOpenAI, batch_id: str, at_least: int) -> bool:
    b = await client.batches.retrieve(batch_id)
    return b.request_counts.completed >= at_least


async def _finished(client: openai.AsyncOpenAI, batch_id: str) -> bool:
    return (await client.batches.retrieve(batch_id)).status == "completed"


async def _output_ids(client: openai.AsyncOpenAI, batch_id: str) -> list[str]:
    b = await client.batches.retrieve(batch_id)
    assert b.error_file_id is None
    data = (await client.files.content(b.output_file_id)).read()
    return [json.loads(x)["custom_id"] for x in data.splitlines()]


async def test_kill9_mid_batch_then_resume_loses_and_duplicates_nothing(batch_stack: BatchStack) -> None:
    n = 40
    client, batch_id = await _batch(batch_stack, "batch-kill9", n)
    first = await batch_stack.start_runner_process()
    try:
        await wait_until(lambda: _completed(client, batch_id, 5), 30, "the first runner to finish some lines")
        await first.kill9()  # lines in flight stay claimed until their lease runs out
    finally:
        await first.stop()
    done_before = (await client.batches.retrieve(batch_id)).request_counts.completed
    assert done_before < n, "the batch finished before the kill; make it longer"
    second = await batch_stack.start_runner_process()
    try:
        await wait_until(lambda: _finished(client, batch_id), 60, "the restarted runner to finish the batch")
    finally:
        await second.stop()
    ids = await _output_ids(client, batch_id)
    assert sorted(ids) == sorted(f"k{i}" for i in range(n))  # each line once: none lost, none twice
    b = await client.batches.retrieve(batch_id)
    assert b.request_counts.completed == n and b.request_counts.failed == 0


async def test_two_runners_share_one_batch(batch_stack: BatchStack) -> None:
    n = 40
    client, batch_id = await _batch(batch_stack, "batch-two", n)
    runners = [await batch_stack.start_runner_process() for _ in range(2)]
    try:
        await wait_until(lambda: _finished(client, batch_id), 60, "two runners to finish the batch")
    finally:
        for r in runners:
            await r.stop()
    ids = await _output_ids(client, batch_id)
    assert sorted(ids) == sorted(f"k{i}" for i in range(n))
    rows = await batch_stack.sql(
        "SELECT done_by, count(*) AS n FROM batch_lines WHERE batch_id = $1 GROUP BY done_by", batch_id)
    assert len(rows) == 2 and sum(r["n"] for r in rows) == n  # both runners wrote lines, each line once


async def test_a_helper_loop_that_fails_ends_the_runner_with_the_reason(
        batch_stack: BatchStack, caplog: pytest.LogCaptureFixture) -> None:
    """Lease renewal and pacing heal outages and never return; one that fails anyway (a bug)
    must end the runner for its supervisor, not leave it claiming lines whose leases lapse."""
    caplog.set_level(logging.ERROR, logger="hpcgate.control.batches")
    pool = await asyncpg.create_pool(batch_stack.dsn, min_size=1, max_size=2)
    try:
        async with httpx.AsyncClient() as client:
            runner = BatchRunner(batch_stack.runner_settings(), pool, client)

            async def pace_breaks() -> None:
                raise RuntimeError("pacing broke")

            runner._pace = pace_breaks  # type: ignore[method-assign]  # the fault, injected
            with pytest.raises(RuntimeError, match="pacing broke"):
                await asyncio.wait_for(runner.run(asyncio.Event()), 10)
    finally:
        await pool.close()
    said = [r for r in caplog.records if r.getMessage() == "batch_runner_helper_failed"]
    assert len(said) == 1 and said[0].fields["helper"] == "pace"  # type: ignore[attr-defined]
