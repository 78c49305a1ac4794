"""The C relay thread (gateway._crelay, gateway.offload): same bytes, same endings as the loop.

The sans-IO core is checked against the Python reference (httptools de-chunking + SseScanner)
on every split of a stream into reads; the thread against scripted upstreams that stall, break
the chunk framing, or behave, and through graceful shutdown. The fault tests of test_faults.py
(engine killed mid-stream, client disconnect, slow reader) run on both relays too.
"""

from __future__ import annotations

import asyncio
import random

import httptools
import pytest

from gateway import _crelay
from gateway.sse import SseScanner, decode_usage_view
from tests.gateway.conftest import post, raw_exchange, read_response, running_gateway
from tests.gateway.scripted import CHUNK, DONE, STREAM_HEAD, USAGE, chunked, scripted_upstream
from tests.support.procs import wait_until


def reference(reads: list[bytes], strip: bool) -> tuple[bytes, tuple[int, int] | None, int]:
    """What the event-loop relay forwards: httptools de-chunks, SseScanner scans."""
    body: list[bytes] = []

    class Sink:
        def on_body(self, data: bytes) -> None:
            body.append(data)

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(STREAM_HEAD)
    scanner = SseScanner(strip_usage=strip)
    out = b""
    for r in reads:
        parser.feed_data(r)
        out += scanner.feed(b"".join(body))
        body.clear()
    out += scanner.flush()
    usage = (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) if scanner.usage else None
    return out, usage, scanner.data_events


@pytest.mark.parametrize("strip", [True, False])
@pytest.mark.parametrize("framing", ["plain", "ext+trailer"])
def test_c_core_matches_the_python_relay_on_every_split(strip: bool, framing: str) -> None:
    fancy = framing != "plain"
    raw = chunked(CHUNK, CHUNK + CHUNK, USAGE, DONE, ext=fancy, trailer=fancy)
    for cut in range(1, len(raw)):  # every split of the response body into two reads
        reads = [raw[:cut], raw[cut:]]
        payloads, usage, events, error, complete, extra = _crelay.transform(reads, strip)
        want, want_usage, want_events = reference(reads, strip)
        assert (error, complete, extra) == (None, True, False)
        assert b"".join(payloads) == want, cut
        assert usage is not None
        u = decode_usage_view(usage).usage
        assert u is not None and (u.prompt_tokens, u.completion_tokens) == want_usage
        assert events == want_events


def test_c_core_on_random_reads_and_edge_cases() -> None:
    rng = random.Random(7)
    events = [CHUNK] * 40 + [b'data: {"choices":[{"delta":{"content":"\\"usage\\""}}],"usage":null}\n\n',
                             USAGE, DONE]
    raw = chunked(*events)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 30)))
        reads = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        for strip in (True, False):
            payloads, usage, n, error, complete, _ = _crelay.transform(reads, strip)
            want, _, want_n = reference(reads, strip)
            assert (b"".join(payloads), n, error, complete) == (want, want_n, None, True)
            assert usage is not None and decode_usage_view(usage).usage is not None
    # A usage event with choices is read but never cut (the client may be reading them).
    with_choices = b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    payloads, usage, *_ = _crelay.transform([chunked(with_choices, DONE)], True)
    assert b"".join(payloads) == with_choices + DONE and usage is not None
    # Framing errors and bytes after the end.
    for bad in (b"zz\r\nabc\r\n", b"3\r\nabcX\r\n", b"3\nabc\r\n", b"1234567890abcdef0\r\n"):
        assert _crelay.transform([bad], True)[3] == "protocol", bad
    assert _crelay.transform([chunked(DONE) + b"HTTP/1.1 200"], True)[4:] == (True, True)
    # An event longer than 1 MiB with no end passes through instead of being held.
    big = b"data: " + b"x" * (1 << 20)
    payloads, *_ = _crelay.transform([b"%x\r\n%b\r\n" % (len(big), big)], True)
    assert payloads == [big]


# -- the thread, against scripted upstreams --------------------------------------------------------
STREAM = post("/v1/chat/completions",
              b'{"model":"m1","messages":[{"role":"user","content":"x"}],"stream":true}')


async def test_upstream_stalling_mid_stream_ends_with_a_timeout_event() -> None:
    async def stall(w: asyncio.StreamWriter) -> None:
        w.write(STREAM_HEAD + b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK))
        await asyncio.sleep(30)  # ... and nothing more

    async with scripted_upstream(stall) as (_, port), running_gateway(
            static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True,
            upstream_read_timeout_s=0.5) as gw:
        reply = await raw_exchange(gw.port, STREAM)
        assert gw.gateway.offloader is not None and gw.gateway.offloader.started == 1
        assert reply.status == 200 and reply.body.startswith(CHUNK)
        assert b'"code":"timeout"' in reply.body  # an SSE error event, then a proper last chunk


async def test_broken_chunk_framing_mid_stream_ends_with_a_protocol_event() -> None:
    async def broken(w: asyncio.StreamWriter) -> None:
        w.write(STREAM_HEAD + b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK))
        await asyncio.sleep(0.05)
        w.write(b"not-hex\r\n")
        await asyncio.sleep(30)

    async with scripted_upstream(broken) as (_, port), running_gateway(
            static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True) as gw:
        reply = await raw_exchange(gw.port, STREAM)
        assert reply.status == 200 and reply.body.startswith(CHUNK)
        assert b'"code":"protocol"' in reply.body


async def test_keep_alive_on_both_sides_after_an_offloaded_stream() -> None:
    async def good(w: asyncio.StreamWriter) -> None:
        w.write(STREAM_HEAD + b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK))
        await asyncio.sleep(0.02)  # the rest arrives in later reads: the relay carries it
        w.write(chunked(CHUNK, USAGE, DONE))

    async with scripted_upstream(good) as (per_conn, port), running_gateway(
            static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for _ in range(3):  # one client connection, one upstream connection, three streams
            writer.write(STREAM)
            reply = await asyncio.wait_for(read_response(reader), 10)
            assert reply.status == 200 and reply.body == CHUNK * 2 + DONE  # usage cut out
        writer.close()
        assert [n for n in per_conn if n] == [3]  # (the scraper's connection carries no request)
        assert gw.gateway.offloader is not None and gw.gateway.offloader.started == 3
        # The usage the relay found is booked (when the loop takes the stream back, which can be
        # just after the client read its end).
        booked = 'hpcgate_gateway_tokens_total{kind="completion",model="m1",worker="0"} 9.0'
        await wait_until(lambda: booked in gw.gateway.metrics.render().decode(), 5, "the usage to be booked")


async def test_shutdown_cuts_offloaded_streams_after_the_deadline() -> None:
    async def endless(w: asyncio.StreamWriter) -> None:
        w.write(STREAM_HEAD)
        while True:
            w.write(b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK))
            await asyncio.sleep(0.02)

    async with scripted_upstream(endless) as (_, port):
        cm = running_gateway(static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True,
                             shutdown_timeout_s=0.3)
        gw = await cm.__aenter__()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(STREAM)
        await asyncio.wait_for(reader.readuntil(CHUNK), 10)
        off = gw.gateway.offloader
        assert off is not None and off.active == 1
        await asyncio.wait_for(cm.__aexit__(None, None, None), 10)  # graceful stop: 0.3 s, then cut
        rest = await asyncio.wait_for(reader.read(), 5)  # the connection is closed, not left hanging
        assert not rest.endswith(b"0\r\n\r\n")  # cut, not finished
        assert off.active == 0
        writer.close()


async def test_a_stream_that_is_not_chunked_stays_on_the_event_loop() -> None:
    """The relay only de-chunks: a length-delimited SSE answer is relayed by the loop, intact."""
    body = CHUNK + USAGE + DONE

    async def sized(w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%b"
                % (len(body), CHUNK))
        await asyncio.sleep(0.02)
        w.write(USAGE + DONE)

    async with scripted_upstream(sized) as (_, port), running_gateway(
            static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True) as gw:
        reply = await raw_exchange(gw.port, STREAM)
        assert reply.status == 200 and reply.body == CHUNK + DONE
        assert gw.gateway.offloader is not None and gw.gateway.offloader.started == 0


@pytest.mark.parametrize("setting", ["on", "off", "relay-fails"])
async def test_which_relay_carries_streams_is_in_ready_and_metrics(setting: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that cannot start its relay thread (no descriptors, no thread) relays on the
    loop instead of dying, and says so, like a worker with the relay turned off."""
    if setting == "relay-fails":
        def no_relay(*_args: object) -> None:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(_crelay, "Relay", no_relay)
    want = "c" if setting == "on" else "event-loop"
    async with scripted_upstream(_whole_stream) as (_, port), running_gateway(
            static_endpoints=(f"m1=http://127.0.0.1:{port}",), no_auth=True,
            stream_offload=setting != "off") as gw:
        ready = await raw_exchange(gw.port, b"GET /ready HTTP/1.1\r\n\r\n")
        assert ready.status == 200 and ready.json()["stream_relay"] == want
        metrics = (await raw_exchange(gw.port, b"GET /metrics HTTP/1.1\r\n\r\n")).body.decode()
        assert f'hpcgate_gateway_stream_relay{{relay="{want}",worker="0"}} 1.0' in metrics
        reply = await raw_exchange(gw.port, STREAM)  # and streams work either way
        assert reply.status == 200 and reply.body == CHUNK + DONE


async def _whole_stream(w: asyncio.StreamWriter) -> None:
    w.write(STREAM_HEAD + chunked(CHUNK, USAGE, DONE))
