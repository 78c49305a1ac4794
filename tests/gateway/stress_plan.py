"""The plan of the relay stress test (test_relay_stress.py), sans-IO: what each engine reply and
each client does, drawn from one seeded RNG, and the verdict on what a client received.

A :class:`Scenario` is one request. Its engine reply is a byte string (``wire``: head, chunked SSE
events, last chunk) played in writes split at drawn offsets, with a fault at byte ``cut``: the
engine closes (``die``: FIN, ``reset``: RST), stalls (``stall``: writes nothing more, so the
gateway's read timeout ends it) or writes garbage framing (``broken``). A fault happens on the
first attempt only, or on every attempt (``persistent``); a retried attempt plays the whole reply.
A :class:`ClientPlan` reads everything, disconnects after some bytes, reads slowly, or pipelines a
second request on the same connection.

Invariants of the verdict (:meth:`Scenario.verdict`): a stream that behaved arrives whole and
exactly once; a fault after events reached the client ends the stream with those events (with a
FIN: exactly the whole events the gateway had received) and one SSE error event with the fault's
code; a fault before anything reached the client is either an error response (5xx, JSON), that
error event alone, or, where a retry could succeed, the complete stream from another attempt;
every response carries its own request id. After a RST, or framing broken within a read, the
client may have fewer of the events the engine sent before the fault, never others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import msgspec

from tests.support.strict_http import Response, sse_events

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
USAGE = (b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,'
         b'"total_tokens":10}}\n\n')
DONE = b"data: [DONE]\n\n"

Fault = Literal["none", "die", "reset", "stall", "broken"]
FAULTS: tuple[Fault, ...] = ("none", "die", "reset", "stall", "broken")
FAULT_WEIGHTS = (30, 25, 10, 15, 20)
ERROR_CODE = {"die": "closed", "reset": "closed", "stall": "timeout", "broken": "protocol"}
STATUS_CODE = {"die": (502, "upstream_error"), "reset": (502, "upstream_error"),
               "stall": (504, "upstream_timeout"), "broken": (502, "upstream_error")}
GARBAGE = (b"zz\r\n", b"3\r\nabcXY", b"fffffffffffffffff\r\n")  # a bad size, no CRLF after data, too big
ClientKind = Literal["full", "abort", "slow", "pipeline"]


class _ErrorEvent(msgspec.Struct):
    error: dict[str, str | None]


@dataclass(frozen=True)
class Scenario:
    sid: int
    usage: bool  # the client asked for usage itself: the usage event reaches it
    events: tuple[bytes, ...]  # content events, the usage event, [DONE]
    wire: bytes  # the engine's whole reply
    data_spans: tuple[tuple[int, int], ...]  # wire offsets of each chunk's data
    splits: tuple[int, ...]  # wire offsets where a new write starts
    pauses: tuple[float, ...]  # after each write
    fault: Fault
    cut: int  # the fault happens after wire[:cut]
    where: str  # what the cut falls on (for messages)
    persistent: bool
    garbage: bytes

    @property
    def rid(self) -> bytes:
        return b"stress-%d" % self.sid

    def request(self) -> bytes:
        options = b',"stream_options":{"include_usage":true}' if self.usage else b""
        body = b'{"model":"m1","messages":[{"role":"user","content":"s%d"}],"stream":true%b}' % (
            self.sid, options)
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nx-request-id: %b\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                % (self.rid, len(body), body))

    def pieces(self, faulty: bool) -> list[tuple[bytes, float]]:
        """The engine's writes (bytes, pause after) for one attempt; a faulty one stops at the cut."""
        end = self.cut if faulty else len(self.wire)
        bounds = [0, *(s for s in self.splits if s < end), end]
        out = [(self.wire[a:b], p) for a, b, p in zip(bounds, bounds[1:], self.pauses, strict=False)]
        return [(data, p) for data, p in out if data]

    def visible(self, received: int) -> list[bytes]:
        """The events a client gets when the gateway received ``wire[:received]``: whole events only,
        the usage event cut when the gateway asked for usage itself."""
        data = sum(max(0, min(received, end) - start) for start, end in self.data_spans)
        out, pos = [], 0
        usage_at = len(self.events) - 2
        for i, e in enumerate(self.events):
            pos += len(e)
            if pos > data:
                break
            if i != usage_at or self.usage:
                out.append(e)
        return out

    @property
    def head_len(self) -> int:
        return len(HEAD)

    def describe(self) -> str:
        how = "every attempt" if self.persistent else "first attempt"
        fault = "behaves" if self.fault == "none" else (
            f"{self.fault}{' ' + repr(self.garbage) if self.fault == 'broken' else ''} {self.where} "
            f"(byte {self.cut} of {len(self.wire)}, head {self.head_len}; {how})")
        return (f"s{self.sid}: {len(self.events) - 2} events, usage={self.usage}, "
                f"{len(self.splits) + 1} writes, {fault}")

    def verdict(self, r: Response) -> str | None:
        """What is wrong with ``r`` as the answer to this request (None: nothing)."""
        rid = r.headers.get(b"x-request-id")  # on every response, errors included
        if rid != self.rid:
            return f"x-request-id {rid!r}, expected {self.rid!r} (another request's response?)"
        full = self.visible(len(self.wire))
        at_fault = self.visible(self.cut)
        # A RST may drop what the engine sent before it, and bad framing fails the whole read that
        # holds it, with the events before it in that read: then maybe nothing reached the client.
        lossy = self.fault in ("reset", "broken")
        unseen = not at_fault or lossy  # the client may have nothing when the engine fails
        retryable = unseen and not self.persistent  # then the gateway tries the other instance
        if r.status == 200:
            if not r.chunked or r.headers.get(b"content-type") != b"text/event-stream":
                return f"a 200 that is not a chunked event stream: {r.headers!r}"
            events = sse_events(r.body)
            if events == full:
                if self.fault == "none" or retryable:
                    return None
                return "a complete stream although the engine failed"
            if self.fault == "none":
                return f"the stream differs from what the engine sent: {_short(r.body)}"
            if self.cut < self.head_len and self.fault != "reset":
                return "a 200 from an engine that never sent a head (expected a retry or an error)"
            if not events or (code := _error_code(events[-1])) is None:
                return f"the stream neither completes nor ends with an error event: {_short(r.body)}"
            if code != ERROR_CODE[self.fault]:
                return f"error event code {code!r}, expected {ERROR_CODE[self.fault]!r}"
            sent = events[:-1]
            if sent != (at_fault[:len(sent)] if lossy else at_fault):
                return (f"before the error event the client got {len(sent)} events, expected "
                        f"{len(at_fault)}: {_short(r.body)}")
            return None
        if r.status >= 500:
            if self.fault == "none":
                return f"an error response to a stream that behaved: {r.status} {_short(r.body)}"
            if not lossy:
                if at_fault:
                    return f"{r.status} although the client should have had {len(at_fault)} events"
                if self.cut < self.head_len and not self.persistent:
                    return f"{r.status}: a failure before the head was not retried"
            if r.chunked or r.headers.get(b"content-type") != b"application/json":
                return f"a {r.status} that is not a JSON error: {r.headers!r}"
            status, code = STATUS_CODE[self.fault]
            got = _error_code(b"data: " + r.body + b"\n\n")
            if (r.status, got) != (status, code) and self.fault != "reset":
                return f"{r.status} {got!r}, expected {status} {code!r}"
            return None
        return f"unexpected status {r.status}: {_short(r.body)}"


def _error_code(event: bytes) -> str | None:
    try:
        return _decode_error(event[6:-2]).error.get("code")
    except msgspec.DecodeError:
        return None


_decode_error = msgspec.json.Decoder(_ErrorEvent).decode


def _short(body: bytes, n: int = 160) -> str:
    return repr(body) if len(body) <= 2 * n else f"{body[:n]!r} ... {body[-n:]!r}"


@dataclass(frozen=True)
class ClientPlan:
    kind: ClientKind
    scenarios: tuple[Scenario, ...]  # two for "pipeline"
    abort_after: int = 0  # "abort": disconnect after this many response bytes
    rst: bool = False  # "abort": with a RST (SO_LINGER 0); else a plain close (a RST too if bytes are unread)

    def describe(self) -> str:
        how = ""
        if self.kind == "abort":
            how = f" after {self.abort_after} bytes ({'RST' if self.rst else 'close'})"
        return f"client {self.kind}{how}; " + "; ".join(s.describe() for s in self.scenarios)


def draw_scenario(rng: random.Random, sid: int) -> Scenario:
    n = rng.randint(1, 24)
    pad = b"x" * rng.choice((0, 0, 40, 400, 3000))  # some streams outgrow the socket buffers
    content = [b'data: {"choices":[{"delta":{"content":"s%de%d%b"}}]}\n\n' % (sid, i, pad) for i in range(n)]
    events = (*content, USAGE, DONE)
    stream = b"".join(events)
    # Chunk boundaries: mostly at event ends; some merged away, some inside an event.
    bounds, pos = set(), 0
    for e in events:
        pos += len(e)
        if rng.random() < 0.8:
            bounds.add(pos)
    bounds |= {rng.randrange(1, len(stream)) for _ in range(rng.randint(0, 3))}
    bounds.add(len(stream))
    upper = rng.random() < 0.2
    wire, spans, sizes, start = bytearray(HEAD), [], [], 0
    for end in sorted(bounds):
        size = b"%X" % (end - start) if upper else b"%x" % (end - start)
        sizes.append((len(wire), len(wire) + len(size) + 2))
        wire += size + b"\r\n"
        spans.append((len(wire), len(wire) + end - start))
        wire += stream[start:end] + b"\r\n"
        start = end
    sizes.append((len(wire), len(wire) + 3))
    wire += b"0\r\n\r\n"
    fault: Fault = rng.choices(FAULTS, FAULT_WEIGHTS)[0]
    cut, where = _draw_cut(rng, fault, head=len(HEAD), spans=spans, sizes=sizes, total=len(wire))
    # Writes: the head alone or with the first chunks, sometimes split itself; then groups of chunks.
    splits = set()
    if rng.random() < 0.25:
        splits |= {rng.randrange(1, len(HEAD)) for _ in range(rng.randint(1, 3))}
    if rng.random() < 0.5:
        splits.add(len(HEAD))
    splits |= {s for s, _ in sizes if s > len(HEAD) and rng.random() < 0.5}
    splits |= {rng.randrange(len(HEAD) + 1, len(wire)) for _ in range(rng.randint(0, 3))}
    pauses = tuple(rng.choice((0.0, 0.0, 0.001, 0.003)) for _ in range(len(splits) + 1))
    return Scenario(sid=sid, usage=rng.random() < 0.3, events=events, wire=bytes(wire),
                    data_spans=tuple(spans), splits=tuple(sorted(splits)), pauses=pauses, fault=fault,
                    cut=cut, where=where, persistent=rng.random() < 0.5, garbage=rng.choice(GARBAGE))


def _draw_cut(rng: random.Random, fault: Fault, *, head: int, spans: list[tuple[int, int]],
              sizes: list[tuple[int, int]], total: int) -> tuple[int, str]:
    if fault == "none":
        return total, "nowhere"
    places = ["after the head", "at a chunk boundary"]
    if fault != "broken":  # garbage is written where a chunk-size line starts
        places += ["before the head", "inside the head", "in the first chunk's data", "inside chunk data",
                   "inside a chunk-size line"]
    where = rng.choice(places)
    if where == "before the head":
        return 0, where
    if where == "inside the head":
        return rng.randrange(1, head), where
    if where == "after the head":
        return head, where
    if where == "at a chunk boundary":
        return rng.choice(sizes[1:])[0], where
    if where == "inside a chunk-size line":
        a, b = rng.choice(sizes)
        return rng.randrange(a + 1, b), where
    a, b = spans[0] if where == "in the first chunk's data" else rng.choice(spans)
    return (rng.randrange(a + 1, b) if b - a > 1 else a), where


def draw_plans(rng: random.Random, streams: int) -> list[ClientPlan]:
    """About ``streams`` requests: one per client, two for a pipelining one."""
    plans: list[ClientPlan] = []
    sid = 0
    while sid < streams:
        kind: ClientKind = rng.choices(("full", "abort", "slow", "pipeline"), (40, 20, 15, 25))[0]
        count = 2 if kind == "pipeline" else 1
        scenarios = tuple(draw_scenario(rng, sid + i) for i in range(count))
        sid += count
        size = len(scenarios[0].wire)
        plans.append(ClientPlan(kind, scenarios, abort_after=rng.choice((0, rng.randrange(1, size))),
                                rst=rng.random() < 0.5))
    return plans
