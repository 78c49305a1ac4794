"""The load of ``hpcgate bench chaos``: a mixed stream of OpenAI requests, each one judged.

Every request opens a fresh connection (``Connection: close``), so a gateway with several
workers serves it on whichever worker the kernel picks, and a SIGKILLed worker takes only its
own requests with it. The client records what a careful application would see
(:class:`bench.chaos_plan.Outcome`): the status and ``Retry-After``, whether any byte arrived,
whether a stream ended with ``[DONE]`` or with an SSE error event, the usage it was told, and
whether it had to give up (``timeout_s``: a hang). Request bodies ask for usage in streams
(``stream_options.include_usage``), so every complete response carries its token counts.
"""

from __future__ import annotations

import asyncio
import time

import httptools
import orjson

from bench.chaos_plan import Outcome, request_kind

MODEL = "chaos"


def request_body(kind: str, n: int, max_tokens: int) -> tuple[str, bytes]:
    """The path and JSON body of request number ``n`` of ``kind``."""
    words = 8 + n % 24
    text = " ".join(f"w{(n * 7 + i) % 97}" for i in range(words))
    tokens = 4 + n % max(1, max_tokens - 3)
    stream = kind.endswith("_stream")
    doc: dict[str, object]
    if kind.startswith("chat"):
        path = "/v1/chat/completions"
        doc = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": tokens}
    elif kind.startswith("completion"):
        path = "/v1/completions"
        doc = {"model": MODEL, "prompt": text, "max_tokens": tokens}
    else:
        return "/v1/embeddings", orjson.dumps({"model": MODEL, "input": text})
    if stream:
        doc["stream"] = True
        doc["stream_options"] = {"include_usage": True}
    return path, orjson.dumps(doc)


class _Response:
    """httptools callbacks: collect the head, split SSE events as they arrive."""

    def __init__(self, out: Outcome) -> None:
        self.out = out
        self.body: list[bytes] = []
        self.sse = b""
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.out.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"retry-after":
            self.out.retry_after = True
        elif lname == b"x-request-id":
            self.out.request_id = value.decode(errors="replace")

    def on_body(self, body: bytes) -> None:
        self.out.got_bytes = True
        if not (self.out.stream and self.out.status == 200):
            self.body.append(body)
            return
        buf = self.sse + body
        while (end := buf.find(b"\n\n")) >= 0:
            self._event(buf[:end])
            buf = buf[end + 2:]
        self.sse = buf

    def _event(self, raw: bytes) -> None:
        for line in raw.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.out.complete = True
                continue
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.out.error = "undecodable SSE event"
                continue
            if "error" in doc:
                self.out.error_event = True
                self.out.error = str(doc["error"])[:200]
                continue
            self.out.data_events += 1
            usage = doc.get("usage")
            if usage:
                self.out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                self.out.completion_tokens = int(usage.get("completion_tokens") or 0)

    def on_message_complete(self) -> None:
        self.done = True
        if self.out.stream and self.out.status == 200:
            return
        raw = b"".join(self.body)
        if self.out.status != 200:
            self.out.error = raw[:200].decode(errors="replace")
            return
        try:
            usage = orjson.loads(raw)["usage"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.out.error = "undecodable response body"
            return
        self.out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.out.completion_tokens = int(usage.get("completion_tokens") or 0)
        self.out.complete = True


async def one_request(host: str, port: int, key: str, *, kind: str, tenant: str, n: int, t0: float,
                      max_tokens: int, timeout_s: float) -> Outcome:
    out = Outcome(kind=kind, tenant=tenant, start=time.monotonic() - t0)
    path, body = request_body(kind, n, max_tokens)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    resp = _Response(out)
    writer: asyncio.StreamWriter | None = None

    async def exchange() -> None:
        nonlocal writer
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body)
        while not resp.done:
            data = await reader.read(65536)
            if not data:
                break
            resp.parser.feed_data(data)

    try:
        await asyncio.wait_for(exchange(), timeout_s)
        if not resp.done and not out.error:
            out.error = "connection closed before the response ended"
    except TimeoutError:
        out.timed_out = True
        out.error = f"no end after {timeout_s:.0f}s"
    except (OSError, httptools.HttpParserError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    out.end = time.monotonic() - t0
    return out


class Load:
    """``concurrency`` loops sending requests back to back until :meth:`stop`; the kinds rotate
    through :func:`request_kind`, the tenants through ``keys``."""

    def __init__(self, host: str, port: int, keys: dict[str, str], concurrency: int, t0: float,
                 *, max_tokens: int, timeout_s: float) -> None:
        self.host, self.port, self.t0 = host, port, t0
        self.keys = list(keys.items())
        self.concurrency = concurrency
        self.max_tokens, self.timeout_s = max_tokens, timeout_s
        self.outcomes: list[Outcome] = []
        self._n = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]

    async def _loop(self) -> None:
        while not self._stop.is_set():
            n = self._n
            self._n += 1
            tenant, key = self.keys[n % len(self.keys)]
            out = await one_request(self.host, self.port, key, kind=request_kind(n), tenant=tenant, n=n,
                                    t0=self.t0, max_tokens=self.max_tokens, timeout_s=self.timeout_s)
            self.outcomes.append(out)
            if out.status != 200 and not self._stop.is_set():
                await asyncio.sleep(0.05)  # a failing gateway is not hammered in a tight loop

    async def stop(self) -> None:
        """Let the requests in flight finish (each is bounded by ``timeout_s``)."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
