"""Multipart audio uploads, relayed to the engine as they arrive (never buffered whole).

With the ``openai`` SDK (``audio.transcriptions.create``) through the gateway to the simulator,
whose answer names the size and digest of the audio it got; against a recording fake engine,
the first half of an upload reaches the engine before the client sends the second half; the
field order, unknown model, size limit and a client leaving mid-upload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import openai
import pytest

from bench.sim.textgen import prompt_seed
from gateway.errors import ApiError
from gateway.http_parse import RequestFramer, Upload
from gateway.multipart import MAX_PREFIX, boundary_of, model_field
from gateway.worker import Worker
from tests.gateway.conftest import raw_exchange, read_response, running_gateway
from tests.support.procs import wait_until
from tests.support.sim import SimProcess

BOUNDARY = "b0undary"


def form(model: str, audio: bytes, model_first: bool = True) -> bytes:
    model_part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n').encode()
    file_part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 "Content-Type: audio/wav\r\n\r\n").encode() + audio + b"\r\n"
    parts = model_part + file_part if model_first else file_part + model_part
    return parts + f"--{BOUNDARY}--\r\n".encode()


def head(length: int | None, path: str = "/v1/audio/transcriptions") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"{framing}\r\n\r\n").encode()


@pytest.fixture(scope="module")
async def gw(sim_a: SimProcess) -> AsyncIterator[Worker]:
    # JSON bodies are limited to 64 KiB here: uploads are not bound by it (they are not buffered)
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True, max_body_bytes=65536,
                               max_upload_bytes=4 * 1024 * 1024) as worker:
        yield worker


async def test_transcription_with_the_openai_sdk(gw: Worker) -> None:
    audio = bytes(range(256)) * 4096  # 1 MiB, far over max_body_bytes
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
    try:
        result = await client.audio.transcriptions.create(model="m1", file=("a.wav", audio))
        assert result.text == f"heard {len(audio)} bytes, digest {prompt_seed(audio.decode('latin-1')):016x}"
    finally:
        await client.close()
    body = form("m1", audio[:1000])
    reply = await raw_exchange(gw.port, head(len(body), "/v1/audio/translations") + body)
    assert reply.status == 200 and reply.json()["text"].startswith("heard 1000 bytes")


async def test_chunked_upload_in_pieces(gw: Worker) -> None:
    body = form("m1", b"x" * 300_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head(None))
        for i in range(0, len(body), 50_000):
            piece = body[i:i + 50_000]
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        reply = await asyncio.wait_for(read_response(reader), 10)
        assert reply.status == 200 and reply.json()["text"].startswith("heard 300000 bytes")
    finally:
        writer.close()


@pytest.mark.parametrize(("body", "status", "reason"), [
    (form("m1", b"abc", model_first=False), 400, "'model' form field must come before the file"),
    (form("nope", b"abc"), 404, "The model 'nope' does not exist"),
    (b"--" + BOUNDARY.encode() + b"--\r\n", 400, "missing required form field 'model'"),
])
async def test_bad_uploads(gw: Worker, body: bytes, status: int, reason: str) -> None:
    reply = await raw_exchange(gw.port, head(len(body)) + body)
    assert reply.status == status and reason in reply.json()["error"]["message"], reply


async def test_an_early_refusal_drops_the_rest_and_keeps_the_connection(gw: Worker) -> None:
    body = form("nope", b"z" * 600_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head(len(body)) + body[:1000])  # the model field, then the audio starts
        reply = await asyncio.wait_for(read_response(reader), 10)
        assert reply.status == 404  # answered at once, while the body is still coming
        writer.write(body[1000:])  # read and dropped by the gateway, not relayed
        writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # the same connection goes on
        assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
    finally:
        writer.close()


async def test_upload_over_the_limit_is_413(gw: Worker) -> None:
    reply = await raw_exchange(gw.port, head(5 * 1024 * 1024))
    assert reply.status == 413


class RecordingEngine:
    """A fake engine that records what arrives and answers 200 once the body is complete."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head_bytes = await reader.readuntil(b"\r\n\r\n")
            length = int(head_bytes.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(self.received) < length:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                self.received += chunk
            body = b'{"text":"ok"}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                         % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def recording_engine() -> AsyncIterator[RecordingEngine]:
    engine = RecordingEngine()
    engine.server = await asyncio.start_server(engine.handle, "127.0.0.1", 0)
    try:
        yield engine
    finally:
        engine.server.close()


async def test_the_engine_gets_the_upload_while_it_arrives() -> None:
    body = form("m1", b"a" * 1_000_000)
    half = len(body) // 2
    async with recording_engine() as engine, running_gateway(static_endpoints=(f"m1={engine.url}",),
                                                             no_auth=True) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(head(len(body)) + body[:half])
            await writer.drain()
            # the first half reaches the engine while the client has not sent the second
            await wait_until(lambda: len(engine.received) >= half, 10, "the first half at the engine")
            assert engine.received == body[:half]
            writer.write(body[half:])
            reply = await asyncio.wait_for(read_response(reader), 10)
            assert reply.status == 200 and reply.json() == {"text": "ok"}
            assert engine.received == body
        finally:
            writer.close()


async def test_a_client_leaving_mid_upload_aborts_the_engine_request() -> None:
    body = form("m1", b"a" * 500_000)
    async with recording_engine() as engine, running_gateway(static_endpoints=(f"m1={engine.url}",),
                                                             no_auth=True) as gw:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head(len(body)) + body[:200_000])
        await writer.drain()
        await wait_until(lambda: len(engine.received) >= 100_000, 10, "the upload to start")
        writer.transport.abort()
        await asyncio.wait_for(engine.closed.wait(), 10)  # the engine's connection is closed too
        assert len(engine.received) < len(body)
        reply = await raw_exchange(gw.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reply.status == 200


# -- sans-IO parts, fed bytes -------------------------------------------------------------------
def test_model_field_is_read_from_the_first_bytes() -> None:
    body = form("m1", b"audio")
    assert all(model_field(body[:n], BOUNDARY.encode()) is None for n in range(0, 60))  # not yet complete
    assert model_field(body, BOUNDARY.encode()) == "m1"
    text_first = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="language"\r\n\r\nde\r\n').encode()
    assert model_field(text_first + body, BOUNDARY.encode()) == "m1"  # other fields may come first
    with pytest.raises(ApiError, match="must come before the file"):
        model_field(form("m1", b"a", model_first=False), BOUNDARY.encode())
    with pytest.raises(ApiError, match="within the first"):
        model_field(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n".encode()
                    + b"m" * MAX_PREFIX, BOUNDARY.encode())
    with pytest.raises(ApiError, match="does not start with its boundary"):
        model_field(b"x" * 40, BOUNDARY.encode())
    assert boundary_of(b'multipart/form-data; boundary="abc"') == b"abc"
    for bad, status in ((None, 415), (b"application/json", 415), (b"multipart/form-data", 400)):
        with pytest.raises(ApiError) as err:
            boundary_of(bad)
        assert err.value.status == status


async def test_the_framer_hands_an_upload_out_with_its_head() -> None:
    framer = RequestFramer(100, 10, 4096, upload_paths=frozenset({b"/up"}), max_upload_bytes=10_000)
    (req,) = framer.feed(b"POST /up HTTP/1.1\r\nContent-Length: 8\r\n\r\nabc")
    upload = req.upload
    assert upload is not None and req.body == b"" and framer.uploading
    assert await upload.read() == b"abc"
    assert framer.feed(b"defgh" + b"GET /x HTTP/1.1\r\n\r\n")[0].path == b"/x"  # the next request follows
    assert await upload.read() == b"defgh" and await upload.read() == b"" and not framer.uploading
    paused: list[bool] = []
    up = Upload()
    up.pause, up.resume = (lambda: paused.append(True)), (lambda: paused.append(False))
    up.feed(b"x" * (Upload.HIGH + 1))
    assert paused == [True]  # over the high-water mark: stop reading the client
    await up.read()
    assert paused == [True, False]
