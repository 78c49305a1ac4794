"""Randomized stress of the stream relays: hundreds of concurrent streams through one worker.

A scripted engine (two ports, two backends, so a retry has somewhere to go) plays, per request,
the reply drawn for it in :mod:`tests.gateway.stress_plan`: it behaves, or dies, stalls or
breaks the chunk framing at a drawn byte (before the head, inside it, after it, inside an event,
inside a chunk-size line), with its head sometimes split over several writes. Clients read all,
disconnect after some bytes, read slowly through small socket buffers, or pipeline a second
request. Every client parses what it gets with a strict parser (tests/support/strict_http.py)
under a deadline, and every response is judged by :meth:`Scenario.verdict`. Once all clients
are done the worker must be back at its baseline: no stream in the C relay (``offloader.active``,
``_crelay.live_streams()``), no connection, no request in flight, and, with the upstream pools
closed, the process's descriptors as before the load.

Runs on both relays. ``HPCGATE_STRESS_SEED`` replays a seed (each run prints the one it drew);
``HPCGATE_STRESS_STREAMS`` sets the number of requests (default 400, about 5 s a relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import secrets
import socket
import struct
import time
from collections import Counter

import pytest

from gateway import _crelay
from gateway.worker import Worker
from tests.gateway.conftest import running_gateway
from tests.gateway.stress_plan import ClientPlan, Scenario, draw_plans, draw_scenario
from tests.gateway.test_faults import BOTH_RELAYS
from tests.support.procs import wait_until
from tests.support.strict_http import FramingError, Response, ResponseParser, sse_events

pytestmark = pytest.mark.serial  # timing-sensitive: ./dev.sh test runs it after the parallel rest

STREAMS = int(os.environ.get("HPCGATE_STRESS_STREAMS", "400"))
CLIENT_DEADLINE_S = 20.0  # no stream of the plan needs a tenth of this: beyond it, it hangs
_SID = re.compile(rb'"content":"s([0-9]+)"')


class StressEngine:
    """The scripted engine: answers each request with its scenario's reply, on two ports."""

    def __init__(self, scenarios: dict[int, Scenario]) -> None:
        self.scenarios = scenarios
        self.attempts: Counter[int] = Counter()  # requests seen per scenario
        self.anomalies: list[str] = []
        self.ports: list[int] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> StressEngine:
        for _ in range(2):
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._answer(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the gateway closed or aborted the connection
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request; False when the connection is to end."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *([0-9]+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else b""
        m = _SID.search(body)
        if not head.startswith(b"POST ") or m is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return True
        s = self.scenarios[int(m.group(1))]
        self.attempts[s.sid] += 1
        faulty = s.fault != "none" and (s.persistent or self.attempts[s.sid] == 1)
        for data, pause in s.pieces(faulty):
            if writer.is_closing():  # the gateway dropped the request (its client left)
                return False
            writer.write(data)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)  # pacing, as an engine's tokens are
        if not faulty:
            return True
        if s.fault == "die":
            writer.close()
            return False
        if s.fault == "reset":
            writer.transport.abort()
            return False
        if s.fault == "broken":
            writer.write(s.garbage)
        rest = await reader.read()  # stall / broken: until the gateway gives up on the connection
        if rest:
            self.anomalies.append(f"s{s.sid}: the gateway wrote {rest[:80]!r} on a connection it should drop")
        return False


async def run_client(gw: Worker, plan: ClientPlan) -> list[str]:
    """Play one client; returns what went wrong (empty: all well)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    got = bytearray()
    parser = ResponseParser()
    responses: list[Response] = []
    want = len(plan.scenarios)
    problems: list[str] = []
    try:
        if plan.kind == "slow":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        if plan.kind == "slow":
            await _shrink_send_buffer(gw, sock)
        await loop.sock_sendall(sock, b"".join(s.request() for s in plan.scenarios))
        async with asyncio.timeout(CLIENT_DEADLINE_S):
            while len(responses) < want:
                if plan.kind == "abort" and len(got) >= plan.abort_after:
                    if plan.rst:  # what arrived so far was parsed strictly; now the client leaves
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                size = random.randint(1, 2048) if plan.kind == "slow" else 65536
                try:
                    data = await loop.sock_recv(sock, size)
                except ConnectionResetError:
                    data = b""
                if not data:
                    if plan.kind != "abort":
                        where = "mid-response" if parser.in_message else "before its response"
                        problems.append(f"the gateway closed the connection {where}: {_tail(got)}")
                    break
                got += data
                responses += parser.feed(data)
                if responses and responses[-1].closes:
                    want = len(responses)
                if plan.kind == "slow":
                    await asyncio.sleep(random.choice((0.0, 0.001, 0.005)))  # a slow reader's pace
    except FramingError as exc:
        problems.append(f"malformed response: {exc}; received {_tail(got)}")
    except TimeoutError:
        problems.append(f"hang: {len(responses)} of {want} responses after {CLIENT_DEADLINE_S} s; "
                        f"received {_tail(got)}")
    finally:
        sock.close()
    for s, r in zip(plan.scenarios, responses, strict=False):
        try:
            wrong = s.verdict(r)
        except FramingError as exc:
            wrong = f"malformed stream body: {exc}"
        if wrong:
            problems.append(f"s{s.sid} ({r.status}): {wrong}")
    return problems


async def _shrink_send_buffer(gw: Worker, sock: socket.socket) -> None:
    """Small kernel buffers on both ends, so a slow reader soon pushes back on the relay."""
    me = sock.getsockname()

    def accepted() -> socket.socket | None:
        for conn in gw.server.connections:
            if conn.transport is not None and conn.transport.get_extra_info("peername") == me:
                return conn.transport.get_extra_info("socket")  # type: ignore[no-any-return]
        return None

    await wait_until(accepted, 5, "the gateway to accept the slow client")
    server_side = accepted()
    assert server_side is not None
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def _tail(data: bytearray, n: int = 300) -> str:
    return repr(bytes(data)) if len(data) <= n else f"{len(data)} bytes ending {bytes(data[-n:])!r}"


def _kind(problem: str) -> str:
    """A problem's gist, for the summary: without the request, the bytes and the numbers."""
    gist = re.split(r" b'|; received|: [0-9]+ bytes", re.sub(r"^s[0-9]+ \([0-9]+\): ", "", problem))[0]
    return re.sub(r"[0-9]+", "N", gist)[:70]


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


async def back_to_baseline(gw: Worker, engine: StressEngine, fds: dict[int, str], live: int) -> None:
    """Everything the load opened is closed again (see the module docstring)."""
    off = gw.gateway.offloader
    await wait_until(lambda: not gw.server.connections, 10, "the gateway to close every client connection")
    await wait_until(lambda: off is None or off.active == 0, 5, "the C relay to give every stream back")
    await wait_until(lambda: _crelay.live_streams() == live, 5, "the C relay to free every stream")
    backends = gw.gateway.backends.values()
    await wait_until(lambda: all(b.inflight == 0 for b in backends), 5, "no request in flight")
    for b in backends:  # the idle keep-alive connections the load left in the pools
        b.pool.close()
    await wait_until(lambda: engine.open_connections == 0, 5, "the engine's connections to close")

    def opened() -> dict[int, str]:  # (descriptors open before may close: an earlier test's garbage)
        return dict(_fds().items() - fds.items())

    try:
        await wait_until(lambda: not opened(), 5, "the descriptors to return to the baseline")
    except AssertionError:
        raise AssertionError(f"descriptors opened by the load and still open: {opened()}") from None


@BOTH_RELAYS
async def test_streams_under_random_faults_end_well_formed_and_leave_nothing(offload: bool) -> None:
    seed = int(os.environ.get("HPCGATE_STRESS_SEED") or secrets.randbits(32))
    print(f"HPCGATE_STRESS_SEED={seed} HPCGATE_STRESS_STREAMS={STREAMS}")
    plans = draw_plans(random.Random(seed), STREAMS)
    scenarios = {s.sid: s for p in plans for s in p.scenarios}
    started = time.monotonic()
    async with StressEngine(scenarios) as engine, running_gateway(
            static_endpoints=(f"m1=http://127.0.0.1:{engine.ports[0]},http://127.0.0.1:{engine.ports[1]}",),
            no_auth=True, stream_offload=offload, upstream_read_timeout_s=0.5, client_send_timeout_s=2.0,
            max_retries=1, retry_budget_ratio=1.0, eject_after_failures=1_000_000,
            scrape_interval_s=3600.0) as gw:
        gw.gateway.scraper.close()  # no scrape connection comes and goes during the count
        fds, live, syscall_errors = _fds(), _crelay.live_streams(), _crelay.syscall_errors()[0]
        results = await asyncio.gather(*(run_client(gw, p) for p in plans))
        failures = [f"{p.describe()}\n    -> " + "\n    -> ".join(r)
                    for p, r in zip(plans, results, strict=True) if r]
        failures += [f"engine: {a}" for a in engine.anomalies]
        failures += [f"engine: s{sid} behaved but was requested {n} times"
                     for sid, n in engine.attempts.items() if n > 1 and scenarios[sid].fault == "none"]
        try:
            await back_to_baseline(gw, engine, fds, live)
        except AssertionError as exc:
            failures.append(f"after the load: {exc}")
        if _crelay.syscall_errors()[0] != syscall_errors:  # a failed epoll_ctl, eventfd write, ...
            failures.append(f"relay system calls failed: {_crelay.syscall_errors()}")
        off = gw.gateway.offloader
        relayed_in_c = off.started if off is not None else 0
    kinds = Counter(p.kind for p in plans)
    faults = Counter(s.fault for s in scenarios.values())
    print(f"{len(scenarios)} requests in {time.monotonic() - started:.1f} s; clients {dict(kinds)}; "
          f"engine {dict(faults)}; {relayed_in_c} streams relayed in C")
    kinds_of_failure = Counter(_kind(problem) for problems in results for problem in problems)
    assert not failures, (f"seed {seed}: {len(failures)} of {len(plans)} clients failed "
                          f"(replay: HPCGATE_STRESS_SEED={seed}); by kind {dict(kinds_of_failure)}:\n"
                          + "\n".join(failures[:15]))
    if offload:
        assert relayed_in_c > len(scenarios) // 4  # the C relay really carried the load


# -- the plan and the parser, without sockets ---------------------------------------------------
def test_the_strict_parser_takes_responses_in_any_split_and_rejects_bad_framing() -> None:
    good = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            b"7\r\ndata: a\r\n2\r\n\n\n\r\n0\r\n\r\n"
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    for cut in range(len(good) + 1):
        p = ResponseParser()
        got = p.feed(good[:cut]) + p.feed(good[cut:])
        assert [(r.status, r.body) for r in got] == [(200, b"data: a\n\n"), (502, b"{}")]
        assert not p.in_message
    assert sse_events(got[0].body) == [b"data: a\n\n"]
    bad = [
        b"1a\r\ndata: x\n\n",  # a bare chunk, no status line
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcX",  # no CRLF after the data
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext\r\n",  # a chunk extension
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx: 1\r\n\r\n",  # a trailer
        b"HTTP/1.1 200 OK\r\ncontent-type: a\r\n\r\n",  # no framing
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    ]
    for data in bad:
        with pytest.raises(FramingError):
            ResponseParser().feed(data)
    with pytest.raises(FramingError):
        sse_events(b"data: a\n\ndata: b\n")


def test_the_plan_judges_responses_by_what_the_engine_sent() -> None:
    rng = random.Random(5)
    for sid in range(200):
        s = draw_scenario(rng, sid)
        assert b"".join(p for p, _ in s.pieces(faulty=False)) == s.wire
        assert b"".join(p for p, _ in s.pieces(faulty=True)) == s.wire[:s.cut if s.fault != "none" else None]
        full = s.visible(len(s.wire))
        assert full[-1] == b"data: [DONE]\n\n" and len(full) == len(s.events) - (0 if s.usage else 1)
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                b"x-request-id: %b\r\n\r\n" % s.rid)
        whole = head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(b"".join(full)), b"".join(full))
        (complete,) = ResponseParser().feed(whole)
        unseen = not s.visible(s.cut) or s.fault in ("reset", "broken")  # (lossy faults: see verdict)
        assert (s.verdict(complete) is None) == (s.fault == "none" or (unseen and not s.persistent))
        if s.fault in ("die", "stall", "broken") and s.cut >= len(s.wire) // 2:
            code = {"die": "closed", "stall": "timeout", "broken": "protocol"}[s.fault]
            error = b'data: {"error":{"message":"m","code":"%b"}}\n\n' % code.encode()
            body = b"".join(s.visible(s.cut)) + error
            (failed,) = ResponseParser().feed(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
            assert s.verdict(failed) is None, s.describe()

