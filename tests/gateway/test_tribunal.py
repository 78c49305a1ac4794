"""Tribunals (virtual models ``tribunal/<name>``) end to end with the openai SDK.

One in-process gateway (auth on, keys from PostgreSQL) in front of three simulators of
different speeds: ``m1`` and ``judge`` on a fast one (~1 ms a token), ``slow`` on a paced one
(20 ms a token), ``slower`` on a gpu-s one (~30 ms a token); ``dead`` is a port that refuses
connections, ``flaky`` has a dead instance and a live one (on the fast simulator). The
tribunals are installed into the worker's table as the endpoint table would bring them (the
control-plane path: tests/control/test_tribunals.py; the whole stack: tests/up/test_up.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import openai
import pytest

from gateway.worker import Worker
from hpcgate.metrics_text import parse_engine_load
from hpcgate.schemas import Juror, TribunalEntry
from tests.gateway.conftest import SECRET, add_tenant, handler_tasks, post, raw_exchange, running_gateway
from tests.support.procs import wait_until
from tests.support.sim import SimProcess, sim_process

ASK = [{"role": "user", "content": "Which planet is the largest?"}]


def tribunal(name: str, jurors: list[str], judge: str = "judge", **kw: Any) -> TribunalEntry:
    return TribunalEntry(name=name, jurors=tuple(Juror(model=m) for m in jurors), judge=judge, **kw)


TRIBUNALS = (
    TribunalEntry(name="full", jurors=(Juror(model="m1", temperature=0.2),
                                       Juror(model="m1", temperature=0.9, system_prompt="Be brief."),
                                       Juror(model="slow")),
                  judge="judge", rounds=1, quorum=2, peer_review=True),
    tribunal("plain", ["m1", "m1"]),
    tribunal("held", ["m1", "m1", "dead"], quorum=2),
    tribunal("lost", ["m1", "dead", "dead"], quorum=2),
    tribunal("fallback", ["m1"], judge="dead", fallback_judge="judge"),
    tribunal("nojudge", ["m1"], judge="dead"),
    tribunal("speeds", ["m1", "slow", "slower"], judge="slow", quorum=3),
    tribunal("grace", ["m1", "slower"], quorum=1, grace_s=0.1),
    tribunal("long", ["slow", "slower"], quorum=2),
    tribunal("deadline", ["slower"], deadline_s=0.5),
    tribunal("routed", ["flaky", "flaky", "m1"], quorum=2),
)


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    s = socket.socket()  # bound, never listening: connections are refused
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
async def sims() -> AsyncIterator[dict[str, SimProcess]]:
    async with sim_process("--model", "m1", "--model", "judge", "--model", "flaky") as fast, \
            sim_process("--model", "slow", "--profile", "paced") as paced, \
            sim_process("--model", "slower", "--profile", "gpu-s") as gpu:
        yield {"fast": fast, "paced": paced, "gpu": gpu}


@pytest.fixture(scope="module")
async def keys(pg_dsn: str) -> dict[str, tuple[int, str]]:
    return {"all": await add_tenant(pg_dsn, "tribunal-all"),
            "some": await add_tenant(pg_dsn, "tribunal-some", allowed=["tribunal/plain", "m1", "judge",
                                                                       "tribunal/full"]),
            "one": await add_tenant(pg_dsn, "tribunal-one", max_concurrent=2)}


@pytest.fixture(scope="module")
async def gw(sims: dict[str, SimProcess], dead_port: int, pg_dsn: str,
             keys: dict[str, tuple[int, str]]) -> AsyncIterator[Worker]:
    fast, paced, gpu = sims["fast"].url, sims["paced"].url, sims["gpu"].url
    async with running_gateway(
        static_endpoints=(f"m1={fast}", f"judge={fast}", f"slow={paced}", f"slower={gpu}",
                          f"dead=http://127.0.0.1:{dead_port}", f"flaky=http://127.0.0.1:{dead_port},{fast}"),
        database_url=pg_dsn, key_hash_secret=SECRET, usage_flush_s=0.2,
    ) as worker:
        worker.gateway.install_tribunals(TRIBUNALS)
        yield worker


def client(gw: Worker, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=key, max_retries=0)


async def running(sim: SimProcess) -> float:
    body = (await raw_exchange(sim.port, b"GET /metrics HTTP/1.1\r\nHost: sim\r\n\r\n")).body
    return parse_engine_load(body).running or 0.0


async def test_full_flow_rounds_peer_review_and_usage(gw: Worker, keys: dict[str, tuple[int, str]],
                                                      pg_dsn: str) -> None:
    tenant_id, key = keys["all"]
    raw = await client(gw, key).chat.completions.with_raw_response.create(
        model="tribunal/full", messages=ASK, max_tokens=8, extra_body={"deliberation": True})
    chat = raw.parse()
    assert chat.model == "tribunal/full" and chat.choices[0].message.content
    ext = raw.http_response.json()["tribunal"]
    roles = [(s["role"], s["round"]) for s in ext["steps"]]
    # jurors, peer review, one round (critique, revision), the verdict; jurors in completion order
    assert sorted(roles[:3]) == [("juror", 0)] * 3 and sorted(roles[3:6]) == [("review", 0)] * 3
    assert roles[6] == ("critique", 1) and sorted(roles[7:10]) == [("revise", 1)] * 3
    assert roles[10] == ("judge", 1) and len(roles) == 11
    assert all(s["ok"] for s in ext["steps"]) and ext["answered"] == 3 and ext["judge"] == "judge"
    rid = raw.http_response.headers["x-request-id"]
    assert raw.parse().id == f"chatcmpl-tribunal-{rid}"
    # usage: the sum of every step, per underlying model too
    steps = ext["steps"]
    assert chat.usage is not None
    assert chat.usage.completion_tokens == sum(s["usage"]["completion_tokens"] for s in steps)
    assert chat.usage.prompt_tokens == sum(s["usage"]["prompt_tokens"] for s in steps)
    by_model = ext["usage_by_model"]
    assert set(by_model) == {"m1", "slow", "judge"}
    assert by_model["slow"]["completion_tokens"] == sum(
        s["usage"]["completion_tokens"] for s in steps if s["model"] == "slow")
    # booked for the tenant per underlying model (and one request of the tribunal itself)
    want = {m: (u["prompt_tokens"], u["completion_tokens"]) for m, u in by_model.items()}

    async def booked() -> bool:
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch(
                "SELECT model, sum(prompt_tokens)::int AS p, sum(completion_tokens)::int AS c"
                " FROM usage_records WHERE tenant_id = $1 GROUP BY model", tenant_id)
        finally:
            await conn.close()
        got = {r["model"]: (r["p"], r["c"]) for r in rows}
        return got.get("tribunal/full") == (0, 0) and all(got.get(m) == v for m, v in want.items())

    await wait_until(booked, 10, "the steps' usage in usage_records")


async def test_non_streaming_without_flag_has_no_extension(gw: Worker,
                                                           keys: dict[str, tuple[int, str]]) -> None:
    raw = await client(gw, keys["all"][1]).chat.completions.with_raw_response.create(
        model="tribunal/plain", messages=ASK, max_tokens=4)
    assert "tribunal" not in raw.http_response.json()
    assert raw.parse().choices[0].message.content


async def test_streaming_with_and_without_deliberation(gw: Worker, keys: dict[str, tuple[int, str]]) -> None:
    c = client(gw, keys["all"][1])
    stream = await c.chat.completions.create(model="tribunal/plain", messages=ASK, max_tokens=6, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [ch async for ch in stream]
    content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(content) == 6  # the verdict token by token
    assert not any(getattr(ch.choices[0].delta, "reasoning_content", None) for ch in chunks if ch.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= 6  # jurors' and judge's tokens summed

    stream = await c.chat.completions.create(model="tribunal/plain", messages=ASK, max_tokens=6, stream=True,
                                             extra_body={"deliberation": True})
    kinds = []
    async for ch in stream:
        if ch.choices:
            delta = ch.choices[0].delta
            if getattr(delta, "reasoning_content", None):
                kinds.append("reasoning")
            if delta.content:
                kinds.append("content")
    assert kinds.count("reasoning") == 2  # one per juror answer, before the verdict
    assert kinds[:2] == ["reasoning", "reasoning"] and set(kinds[2:]) == {"content"}


async def test_quorum_held_and_lost(gw: Worker, keys: dict[str, tuple[int, str]]) -> None:
    c = client(gw, keys["all"][1])
    raw = await c.chat.completions.with_raw_response.create(
        model="tribunal/held", messages=ASK, max_tokens=4, extra_body={"deliberation": True})
    ext = raw.http_response.json()["tribunal"]
    assert ext["answered"] == 2
    failed = [s for s in ext["steps"] if not s["ok"]]
    assert [s["model"] for s in failed] == ["dead"] and "connect" in failed[0]["error"]
    with pytest.raises(openai.APIStatusError) as err:
        await c.chat.completions.create(model="tribunal/lost", messages=ASK, max_tokens=4)
    assert err.value.status_code == 502
    body: Any = err.value.body
    assert body["code"] == "tribunal_quorum_lost"
    assert "of 3 jurors answered" in body["message"] and "dead: upstream connect failed" in body["message"]
    # streaming: the same error before anything was written
    with pytest.raises(openai.APIStatusError) as err:
        await c.chat.completions.create(model="tribunal/lost", messages=ASK, max_tokens=4, stream=True)
    assert err.value.status_code == 502


async def test_judge_fallback_and_judge_failure(gw: Worker, keys: dict[str, tuple[int, str]]) -> None:
    c = client(gw, keys["all"][1])
    raw = await c.chat.completions.with_raw_response.create(
        model="tribunal/fallback", messages=ASK, max_tokens=4, extra_body={"deliberation": True})
    ext = raw.http_response.json()["tribunal"]
    assert ext["judge"] == "judge"
    assert [(s["role"], s["model"], s["ok"]) for s in ext["steps"][1:]] == [("judge", "dead", False),
                                                                           ("judge", "judge", True)]
    stream = await c.chat.completions.create(model="tribunal/fallback", messages=ASK, max_tokens=5,
                                             stream=True)
    assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    with pytest.raises(openai.APIStatusError) as err:
        await c.chat.completions.create(model="tribunal/nojudge", messages=ASK, max_tokens=4)
    assert err.value.status_code == 502 and "the judge failed" in str(err.value)


async def test_latency_is_slowest_juror_plus_judge_not_the_sum(gw: Worker,
                                                               keys: dict[str, tuple[int, str]]) -> None:
    c = client(gw, keys["all"][1])
    start = time.perf_counter()
    raw = await c.chat.completions.with_raw_response.create(
        model="tribunal/speeds", messages=ASK, max_tokens=15,
        extra_body={"deliberation": True, "ignore_eos": True})
    total = time.perf_counter() - start
    steps = raw.http_response.json()["tribunal"]["steps"]
    jurors = [s["duration_s"] for s in steps if s["role"] == "juror"]
    judge = next(s["duration_s"] for s in steps if s["role"] == "judge")
    assert len(jurors) == 3 and max(jurors) > 5 * min(jurors)  # the speeds differ
    assert total >= max(jurors) + judge  # the judge waits for the slowest (quorum 3)
    assert total < 0.9 * (sum(jurors) + judge)  # but the jurors ran concurrently


async def test_stragglers_cancelled_after_grace_and_deadline(gw: Worker, sims: dict[str, SimProcess],
                                                             keys: dict[str, tuple[int, str]]) -> None:
    c = client(gw, keys["all"][1])
    start = time.perf_counter()
    raw = await c.chat.completions.with_raw_response.create(
        model="tribunal/grace", messages=ASK, max_tokens=2000,
        extra_body={"deliberation": True, "ignore_eos": True})
    assert time.perf_counter() - start < 10  # the straggler alone would take about a minute
    steps = raw.http_response.json()["tribunal"]["steps"]
    late = [s for s in steps if s["model"] == "slower"]
    assert late[0]["error"] == "cancelled after the quorum's grace"
    await wait_until(lambda: _zero(running(sims["gpu"])), 5, "the straggler's slot to be freed")
    with pytest.raises(openai.APIStatusError) as err:  # the total deadline: the juror's budget ran out
        await c.chat.completions.create(model="tribunal/deadline", messages=ASK, max_tokens=2000,
                                        extra_body={"ignore_eos": True})
    assert err.value.status_code == 502 and "timed out" in str(err.value)


async def _zero(value: Any) -> bool:
    return await value == 0


async def test_client_disconnect_aborts_every_step(gw: Worker, sims: dict[str, SimProcess],
                                                   keys: dict[str, tuple[int, str]]) -> None:
    body = (b'{"model":"tribunal/long","messages":[{"role":"user","content":"hi"}],"max_tokens":3000,'
            b'"ignore_eos":true,"stream":true}')
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(post("/v1/chat/completions", body, keys["all"][1]))
    await wait_until(lambda: _both_running(sims), 10, "both jurors to run on their engines")
    writer.transport.abort()  # the client goes away
    await wait_until(lambda: _zero(running(sims["paced"])), 5, "the first juror's slot to be freed")
    await wait_until(lambda: _zero(running(sims["gpu"])), 5, "the second juror's slot to be freed")
    await wait_until(lambda: handler_tasks(gw) == 0, 5, "the tribunal's task to end")


async def _both_running(sims: dict[str, SimProcess]) -> bool:
    return await running(sims["paced"]) >= 1 and await running(sims["gpu"]) >= 1


async def test_listing_permissions_and_bad_input(gw: Worker, keys: dict[str, tuple[int, str]]) -> None:
    every, some = client(gw, keys["all"][1]), client(gw, keys["some"][1])
    ids = {m.id async for m in every.models.list()}
    assert {"tribunal/full", "tribunal/plain", "tribunal/speeds"} <= ids
    ids = {m.id async for m in some.models.list()}
    assert "tribunal/plain" in ids and "tribunal/full" not in ids  # full calls "slow", not allowed
    assert (await some.models.retrieve("tribunal/plain")).id == "tribunal/plain"
    with pytest.raises(openai.PermissionDeniedError, match="'slow'"):  # a juror the key may not use
        await some.chat.completions.create(model="tribunal/full", messages=ASK, max_tokens=4)
    with pytest.raises(openai.PermissionDeniedError):  # a tribunal the key may not use
        await some.chat.completions.create(model="tribunal/held", messages=ASK, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        await every.chat.completions.create(model="tribunal/nope", messages=ASK, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="chat/completions only"):
        await every.completions.create(model="tribunal/plain", prompt="x", max_tokens=4)
    for extra in ({"n": 2}, {"deliberation": "yes"}, {"messages": []}, {"messages": ["hi"]}):
        with pytest.raises(openai.BadRequestError):
            await every.chat.completions.create(model="tribunal/plain", messages=ASK, max_tokens=4,
                                                extra_body=extra)
    await wait_until(lambda: handler_tasks(gw) == 0, 5, "handler tasks to end")


async def test_steps_use_the_routing_retries_and_the_tenants_limits(
        gw: Worker, keys: dict[str, tuple[int, str]]) -> None:
    # "flaky" has a dead instance and a live one: its steps end on the live one (least-queue
    # choice, ejection and retries, as for any request)
    raw = await client(gw, keys["all"][1]).chat.completions.with_raw_response.create(
        model="tribunal/routed", messages=ASK, max_tokens=4, extra_body={"deliberation": True})
    assert all(s["ok"] for s in raw.http_response.json()["tribunal"]["steps"])
    # a tenant with 2 concurrent requests: the third concurrent juror is refused, the quorum holds
    raw = await client(gw, keys["one"][1]).chat.completions.with_raw_response.create(
        model="tribunal/routed", messages=ASK, max_tokens=4, extra_body={"deliberation": True})
    steps = raw.http_response.json()["tribunal"]["steps"]
    refused = [s for s in steps if not s["ok"]]
    assert len(refused) == 1 and "too many concurrent requests" in refused[0]["error"]
    assert steps[-1]["role"] == "judge" and steps[-1]["ok"]  # the judge ran after the jurors left
