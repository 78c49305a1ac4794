"""The Files and Batch APIs end to end with the ``openai`` SDK (sync and async), through the
gateway, executed by the batch runner against the simulator."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from control.batch.metrics import _RunnerCollector
from tests.batch.conftest import MAX_FILE, MODEL, QUOTA, BatchStack, chat_line, jsonl, runner
from tests.control.daemons import ADMIN_TOKEN
from tests.support.procs import child_env, hpcgate_cmd, wait_until


def _sync(stack: BatchStack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)


def _async(stack: BatchStack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0)


async def _poll(client: openai.AsyncOpenAI, batch_id: str, *statuses: str, timeout: float = 30.0) -> Any:
    found: list[Any] = []

    async def reached() -> bool:
        found[:] = [await client.batches.retrieve(batch_id)]
        return found[0].status in statuses

    await wait_until(reached, timeout, f"batch {batch_id} to reach {statuses}")
    return found[0]


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in data.splitlines() if x.strip()]


async def test_sync_sdk_upload_create_poll_download(batch_stack: BatchStack) -> None:
    """The SDK's sync calls (run in a thread: the gateway shares this event loop)."""
    key = await batch_stack.tenant("batch-sync")
    client = _sync(batch_stack, key)
    lines = [chat_line(f"req-{i}") for i in range(5)]
    bad_request = chat_line("req-bad")
    bad_request["body"]["messages"] = []  # the engine answers 400: goes to the error file
    data = jsonl([*lines, bad_request])
    up = await asyncio.to_thread(client.files.create, file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert up.bytes == len(data) and up.purpose == "batch" and up.filename == "in.jsonl"
    assert (await asyncio.to_thread(client.files.retrieve, up.id)).id == up.id
    content = await asyncio.to_thread(client.files.content, up.id)
    assert content.read() == data
    batch = await asyncio.to_thread(client.batches.create, input_file_id=up.id,
                                    endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"project": "abstracts"})
    assert batch.status == "validating" and batch.metadata == {"project": "abstracts"}
    async with runner(batch_stack):
        done = await _poll(_async(batch_stack, key), batch.id, "completed")
    assert done.request_counts.total == 6 and done.request_counts.completed == 5
    assert done.request_counts.failed == 1
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.usage is not None and done.usage.output_tokens > 0
    out = _lines((await asyncio.to_thread(client.files.content, done.output_file_id)).read())
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(5)]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    assert out[0]["response"]["body"]["object"] == "chat.completion"
    errs = _lines((await asyncio.to_thread(client.files.content, done.error_file_id)).read())
    assert [e["custom_id"] for e in errs] == ["req-bad"] and errs[0]["response"]["status_code"] == 400
    deleted = await asyncio.to_thread(client.files.delete, up.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await asyncio.to_thread(client.files.retrieve, up.id)


async def test_async_sdk_list_paging(batch_stack: BatchStack) -> None:
    key = await batch_stack.tenant("batch-paging")
    client = _async(batch_stack, key)
    ids = []
    for i in range(3):
        f = await client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line("a")])), purpose="batch")
        ids.append(f.id)
    page = await client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    rest = await client.files.list(limit=2, after=page.data[-1].id)
    assert [f.id for f in rest.data] == ids[:1] and not rest.has_more
    assert [f.id async for f in client.files.list(limit=1)] == ids[::-1]  # the SDK follows the cursor
    batches = [await client.batches.create(input_file_id=i, endpoint="/v1/chat/completions",
                                           completion_window="24h") for i in ids]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == [b.id for b in batches[::-1][:2]] and first.has_more
    assert [b.id async for b in client.batches.list(limit=2)] == [b.id for b in batches[::-1]]
    # the tenant's limit on active batches (3 in these tests): the fourth is refused
    with pytest.raises(openai.RateLimitError):
        await client.batches.create(input_file_id=ids[0], endpoint="/v1/chat/completions",
                                    completion_window="24h")
    for b in batches:
        await client.batches.cancel(b.id)
    async with runner(batch_stack):
        for b in batches:
            assert (await _poll(client, b.id, "cancelled")).cancelled_at


async def test_tenant_isolation_is_404(batch_stack: BatchStack) -> None:
    a = _async(batch_stack, await batch_stack.tenant("batch-iso-a"))
    b = _async(batch_stack, await batch_stack.tenant("batch-iso-b"))
    f = await a.files.create(file=("x.jsonl", jsonl([chat_line("a")])), purpose="batch")
    batch = await a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    for call in (b.files.retrieve(f.id), b.files.content(f.id), b.files.delete(f.id),
                 b.batches.retrieve(batch.id), b.batches.cancel(batch.id),
                 b.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await b.files.list()).data == [] and (await b.batches.list()).data == []
    await a.batches.cancel(batch.id)


async def test_oversize_upload_is_413(batch_stack: BatchStack) -> None:
    client = _async(batch_stack, await batch_stack.tenant("batch-big"))
    big = jsonl([chat_line(f"r{i}", content="x" * 1000) for i in range(MAX_FILE // 1000 + 10)])
    assert len(big) > MAX_FILE
    with pytest.raises(openai.APIStatusError) as err:
        await client.files.create(file=("big.jsonl", big), purpose="batch")
    assert err.value.status_code == 413


async def test_tenant_storage_quota_is_413_and_freed_by_delete(batch_stack: BatchStack) -> None:
    client = _async(batch_stack, await batch_stack.tenant("batch-quota"))
    chunk = jsonl([chat_line(f"q{i}", content="y" * 1000) for i in range(200)])  # ~220 KB
    assert QUOTA // len(chunk) == 4
    ids = [(await client.files.create(file=("q.jsonl", chunk), purpose="batch")).id for _ in range(4)]
    with pytest.raises(openai.APIStatusError) as err:
        await client.files.create(file=("q.jsonl", chunk), purpose="batch")
    assert err.value.status_code == 413 and "quota" in str(err.value)
    await client.files.delete(ids[0])
    await client.files.create(file=("q.jsonl", chunk), purpose="batch")


async def test_concurrent_uploads_never_pass_the_storage_quota_together(batch_stack: BatchStack) -> None:
    """Eight uploads at once, each passing the quota left at its start: at most four fit, and
    the rest are refused with 413 once the first ones are stored; none is lost half-written."""
    client = _async(batch_stack, await batch_stack.tenant("batch-quota-race"))
    chunk = jsonl([chat_line(f"c{i}", content="z" * 1000) for i in range(200)])
    assert QUOTA // len(chunk) == 4
    results = await asyncio.gather(
        *(client.files.create(file=("c.jsonl", chunk), purpose="batch") for _ in range(8)),
        return_exceptions=True,
    )
    stored = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError) and r.status_code == 413]
    assert len(stored) + len(refused) == 8, results
    assert 1 <= len(stored) <= 4, results
    listed = (await client.files.list()).data
    assert sorted(f.id for f in listed) == sorted(f.id for f in stored)
    for f in stored:
        assert (await client.files.content(f.id)).read() == chunk


async def test_bad_lines_fail_the_batch_naming_each(batch_stack: BatchStack) -> None:
    client = _async(batch_stack, await batch_stack.tenant("batch-bad", ))
    good = chat_line("ok")
    wrong_method = {**chat_line("m"), "method": "GET"}
    wrong_url = {**chat_line("u"), "url": "/v1/embeddings"}
    no_model = chat_line("nm")
    del no_model["body"]["model"]
    no_custom = {k: v for k, v in chat_line("x").items() if k != "custom_id"}
    body_not_object = {**chat_line("b"), "body": [1]}
    items = [good, None, good, wrong_method, wrong_url, no_model, chat_line("unk", model="no-such-model"),
             no_custom, body_not_object]
    lines = [b"{not json" if x is None else json.dumps(x).encode() for x in items] + [b"[1, 2]"]
    f = await client.files.create(file=("bad.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    async with runner(batch_stack):
        failed = await _poll(client, batch.id, "failed")
    assert failed.failed_at and failed.output_file_id is None and failed.request_counts.total == 0
    got = {(e.line, e.code) for e in failed.errors.data}
    assert got == {(2, "invalid_json"), (3, "duplicate_custom_id"), (4, "invalid_method"),
                   (5, "mismatched_url"), (6, "missing_model"), (7, "model_not_allowed"),
                   (8, "invalid_request"), (9, "invalid_request"), (10, "invalid_request")}
    started = await batch_stack.sql("SELECT count(*) AS n FROM batch_lines WHERE batch_id = $1", batch.id)
    assert started[0]["n"] == 0  # nothing was started


async def test_bad_requests_get_openai_errors(batch_stack: BatchStack) -> None:
    client = _async(batch_stack, await batch_stack.tenant("batch-badreq"))
    f = await client.files.create(file=("x.jsonl", jsonl([chat_line("a")])), purpose="batch")
    for kwargs in ({"endpoint": "/v1/nope", "completion_window": "24h"},
                   {"endpoint": "/v1/chat/completions", "completion_window": "1h"}):
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(input_file_id=f.id, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                    completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    for bad_list in (client.files.list(limit=0), client.batches.list(limit=101)):
        with pytest.raises(openai.BadRequestError):
            await bad_list
    with pytest.raises(openai.AuthenticationError):
        await _async(batch_stack, "hpg_wrong").files.list()


async def test_cancel_mid_run_keeps_finished_lines(batch_stack: BatchStack) -> None:
    client = _async(batch_stack, await batch_stack.tenant("batch-cancel"))
    n = 40
    data = jsonl([chat_line(f"c{i}", max_tokens=16) for i in range(n)])
    f = await client.files.create(file=("c.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    async with runner(batch_stack, min_concurrency=2, max_concurrency=2):
        await wait_until(lambda: _counted(client, batch.id, 3), 30, "some lines to finish")
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        done = await _poll(client, batch.id, "cancelled")
    finished = done.request_counts.completed
    assert 3 <= finished < n
    out = _lines((await client.files.content(done.output_file_id)).read())
    assert len(out) == finished == len({o["custom_id"] for o in out})


async def _counted(client: openai.AsyncOpenAI, batch_id: str, at_least: int) -> bool:
    return (await client.batches.retrieve(batch_id)).request_counts.completed >= at_least


async def test_expiry_reports_unfinished_lines(batch_stack: BatchStack) -> None:
    client = _async(batch_stack, await batch_stack.tenant("batch-expire"))
    n = 40
    data = jsonl([chat_line(f"e{i}", max_tokens=16) for i in range(n)])
    f = await client.files.create(file=("e.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    async with runner(batch_stack, min_concurrency=2, max_concurrency=2):
        await wait_until(lambda: _counted(client, batch.id, 3), 30, "some lines to finish")
        # the completion window passes
        await batch_stack.sql("UPDATE batches SET expires_at = now() WHERE batch_id = $1", batch.id)
        done = await _poll(client, batch.id, "expired")
    assert done.expired_at
    out = _lines((await client.files.content(done.output_file_id)).read())
    errs = _lines((await client.files.content(done.error_file_id)).read())
    assert len(out) == done.request_counts.completed and 3 <= len(out) < n
    assert {e["error"]["code"] for e in errs} == {"batch_expired"}
    assert sorted(o["custom_id"] for o in out + errs) == sorted(f"e{i}" for i in range(n))



async def test_admin_batches_lists_every_tenant_with_progress(batch_stack: BatchStack) -> None:
    client = _async(batch_stack, await batch_stack.tenant("batch-admin"))
    f = await client.files.create(file=("a.jsonl", jsonl([chat_line(f"a{i}") for i in range(4)])),
                                  purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    async with runner(batch_stack) as r:
        await _poll(client, batch.id, "completed")
        registry = CollectorRegistry()
        registry.register(_RunnerCollector(r))
        exposition = generate_latest(registry).decode()
    assert 'hpcgate_batch_lines_total{result="ok"} 4.0' in exposition
    assert f'hpcgate_batch_concurrency_limit{{model="{MODEL}"}}' in exposition
    env = child_env(HPCGATE_CONTROL_URL=f"http://127.0.0.1:{batch_stack.api.port}",
                    HPCGATE_ADMIN_TOKEN=ADMIN_TOKEN)
    argv = hpcgate_cmd("admin", "batches", "--tenant", "batch-admin", "--json")
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    rows = json.loads(out)
    assert [(r["batch_id"], r["tenant"], r["status"], r["completed"], r["progress_pct"]) for r in rows] == [
        (batch.id, "batch-admin", "completed", 4, 100.0)]
    assert rows[0]["lines_per_s"] > 0 and rows[0]["eta_s"] is None
    proc = await asyncio.create_subprocess_exec(*hpcgate_cmd("admin", "batches"), env=env,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and "PROGRESS_PCT" in out.decode() and batch.id in out.decode()
