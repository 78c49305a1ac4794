"""The simulator application: settings, HTTP routing, the engine loop and the server lifecycle.

Invariants: one engine and one engine loop task per simulator; request handlers are
synchronous (they answer at once, or hand a sequence to the engine whose loop writes the
response); the loop advances a modelled clock (step ends are computed, not measured) and only
falls back to the wall clock when it is more than :data:`SLACK_S` behind, so CPU noise on the
host does not leak into the latencies the simulator produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Literal

import msgspec

from bench.sim import extras, wire
from bench.sim.engine import Engine, Seq
from bench.sim.http import Connection, Request
from bench.sim.metrics import CONTENT_TYPE, CacheInfo, SimMetrics
from bench.sim.prefix_cache import SeqPrefix, Token, chat_tokens
from bench.sim.profiles import PROFILES
from bench.sim.textgen import (
    TOKEN_TEXT,
    bag_of_words,
    generated_text,
    output_length,
    prompt_seed,
    token_index,
)
from hpcgate.logs import get_logger
from hpcgate.settings import LogLevel, Port, PositiveFloat

log = get_logger("hpcgate.sim")

SLACK_S = 0.05
FAULT_DELAY_S = 0.05  # head, then this long "in prefill", then the connection closes
JSON = b"application/json"
EMBEDDING_DIM = 256  # hashed bag of words (textgen.bag_of_words)


class SimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of section ``sim`` (``HPCGATE_SIM_*``); also the in-process API's config."""

    host: str = "127.0.0.1"
    port: Port = 8000
    model: list[str] = msgspec.field(default_factory=lambda: ["sim-model"])  # first = default
    profile: Literal["fast", "paced", "gpu-s", "gpu-l"] = "fast"
    api_key: str | None = None
    max_num_seqs: Annotated[int, msgspec.Meta(ge=1)] | None = None  # None: the profile's
    max_model_len: Annotated[int, msgspec.Meta(ge=2)] = 32768
    legacy_metrics: bool = False
    enable_prefix_caching: bool = True  # vLLM V1's default: automatic prefix caching on
    eos_mean_tokens: PositiveFloat = 256.0  # mean natural answer length without ignore_eos
    # Fault mode: every Nth streamed request gets its response head, then the connection closes
    # before the first token, as when an engine dies or is preempted during prefill (0: never).
    fail_after_head_every: Annotated[int, msgspec.Meta(ge=0)] = 0
    # On SIGTERM: stop accepting, let requests in progress finish for up to this long, then cut.
    shutdown_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # vLLM's --scheduling-policy: "priority" admits waiting requests by their ``priority`` field
    # (lower first); with "fcfs" a request with a non-zero priority is refused (400), as in vLLM.
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    log_level: LogLevel = "info"


class _ModelField(msgspec.Struct):
    model: str | None = None


_POOLING_ROUTES: dict[str, Callable[[bytes, str], bytes]] = {
    "/v1/rerank": extras.rerank_body, "/rerank": extras.rerank_body, "/v2/rerank": extras.rerank_body,
    "/v1/score": extras.score_body, "/score": extras.score_body,
    "/pooling": extras.pooling_body, "/classify": extras.classify_body,
    "/tokenize": lambda body, _model: body, "/detokenize": lambda body, _model: body,  # answered in _pooling
}


class _Sink:
    """The response of one generation request; receives its tokens from the engine."""

    __slots__ = ("chat", "conn", "include_usage", "maker", "model", "prompt_tokens", "request_id",
                 "seq", "sim", "stream")

    def __init__(self, sim: Simulator, conn: Connection, *, chat: bool, stream: bool, include_usage: bool,
                 request_id: str, model: str, prompt_tokens: int) -> None:
        self.sim = sim
        self.conn = conn
        self.chat = chat
        self.stream = stream
        self.include_usage = include_usage
        self.request_id = request_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.maker = wire.ChunkMaker(chat, request_id, int(time.time()), model) if stream else None
        self.seq: Seq | None = None

    def on_token(self, seq: Seq, finish_reason: str | None) -> None:
        conn, maker = self.conn, self.maker
        if maker is None:
            if finish_reason is not None:
                self._send_whole(seq, finish_reason)
            return
        tok = token_index(seq.seed, seq.generated - 1)
        if finish_reason is None:
            data = maker.token(tok)
            if seq.generated == 1 and self.chat:
                data = maker.role() + data
            conn.write(data)
            return
        parts = [maker.final_token(tok, finish_reason)]
        if seq.generated == 1 and self.chat:
            parts.insert(0, maker.role())
        if self.include_usage:
            parts.append(maker.usage(self.prompt_tokens, seq.generated))
        parts += (wire.DONE_FRAME, wire.LAST_CHUNK)
        conn.write(b"".join(parts))
        conn.finish()

    def _send_whole(self, seq: Seq, reason: str) -> None:
        text = generated_text(seq.seed, seq.generated)
        build = wire.chat_body if self.chat else wire.completion_body
        body = build(request_id=self.request_id, created=int(time.time()), model=self.model, text=text,
                     reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=seq.generated)
        self.conn.send(200, JSON, body)

    def disconnected(self) -> None:
        if self.seq is not None:
            self.sim.abort(self.seq)


class _ResponsesSink:
    """A Responses API answer (``/v1/responses``), streamed as its events or sent whole."""

    __slots__ = ("conn", "events", "model", "prompt_tokens", "rid", "seq", "sim")

    def __init__(self, sim: Simulator, conn: Connection, *, stream: bool, rid: str, model: str,
                 prompt_tokens: int) -> None:
        self.sim, self.conn, self.rid, self.model, self.prompt_tokens = sim, conn, rid, model, prompt_tokens
        self.events = extras.ResponsesStream(rid, model, int(time.time())) if stream else None
        self.seq: Seq | None = None

    def on_token(self, seq: Seq, finish_reason: str | None) -> None:
        events = self.events
        if events is None:
            if finish_reason is not None:
                text = generated_text(seq.seed, seq.generated)
                body = wire.encode(extras.response_obj(self.rid, self.model, int(time.time()), text=text,
                                                       prompt=self.prompt_tokens, completion=seq.generated))
                self.conn.send(200, JSON, body)
            return
        data = events.start() if seq.generated == 1 else b""
        data += events.delta(TOKEN_TEXT[token_index(seq.seed, seq.generated - 1)])
        if finish_reason is None:
            self.conn.write(data)
            return
        text = generated_text(seq.seed, seq.generated)
        self.conn.write(data + events.end(text, self.prompt_tokens, seq.generated) + wire.LAST_CHUNK)
        self.conn.finish()

    def disconnected(self) -> None:
        if self.seq is not None:
            self.sim.abort(self.seq)


SIM_ENGINE = "hpcgate sim"


def _prompt_tokens(req: wire.ChatRequest | wire.CompletionRequest) -> Sequence[Token]:
    """The prompt's tokens for the prefix cache (textgen's rule: a word is a token)."""
    if isinstance(req, wire.ChatRequest):
        texts: list[str] = []
        for msg in req.messages:
            if isinstance(msg.content, str):
                texts.append(msg.content)
            elif msg.content:
                texts += [p.text for p in msg.content if p.text]
        return chat_tokens(texts)
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt.split()
    first = prompt[0]
    if isinstance(first, str):
        return first.split()
    if isinstance(first, list):
        return list(first)
    return [t for t in prompt if isinstance(t, int)]


class Simulator:
    """One simulated vLLM server: engine, metrics, routes."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.profile = PROFILES[config.profile]
        self.models = tuple(config.model) or ("sim-model",)
        self.metrics = SimMetrics(self.models[0], config.legacy_metrics, self._gauges, self._cache_info)
        self.engine = Engine(self.profile, self.metrics, config.max_num_seqs,
                             by_priority=config.scheduling_policy == "priority",
                             prefix_caching=config.enable_prefix_caching)
        self._auth = b"Bearer " + config.api_key.encode() if config.api_key else None
        # vLLM's /version, plus what a benchmark needs to say which backend it measured
        self._version = msgspec.json.encode(
            {"version": "0.10.2", "engine": SIM_ENGINE, "profile": config.profile})
        self._wake = asyncio.Event()
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.aborted = 0
        self.streams = 0  # streamed generation requests accepted
        self.faults = 0  # streams failed on purpose by the fault mode
        self.upload_bytes = 0  # multipart bodies received (audio)
        self.host = config.host
        self.port = 0
        self.server: asyncio.Server | None = None  # set by run_simulator
        self._created = int(time.time())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _gauges(self) -> tuple[int, int, float]:
        e = self.engine
        return len(e.running), len(e.waiting), e.kv_usage()

    def _cache_info(self) -> CacheInfo:
        e = self.engine
        pc = e.prefix_cache
        return CacheInfo(block_size=self.profile.block_size, num_gpu_blocks=e.total_blocks,
                         enabled=pc is not None, queries=pc.queries if pc else 0, hits=pc.hits if pc else 0)

    def connection(self) -> Connection:
        conn = Connection(self.dispatch)
        self._conns.add(conn)
        return conn

    # --- engine loop ---------------------------------------------------------------------
    def submit(self, seq: Seq) -> None:
        self.engine.add(seq)
        self._wake.set()

    def abort(self, seq: Seq) -> None:
        if self.engine.abort(seq):
            self.aborted += 1
            self.metrics.on_abort(seq, asyncio.get_running_loop().time())

    async def run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        start: float | None = None
        while True:
            if not engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                start = None
            now = loop.time()
            if start is None or now - start > SLACK_S:
                start = now  # idle or too far behind: rejoin the wall clock
            duration = engine.schedule(start)
            if duration is None:
                self._wake.clear()
                await self._wake.wait()
                start = None
                continue
            end = start + duration
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            engine.complete_step(end)
            start = end

    # --- routing -------------------------------------------------------------------------
    def dispatch(self, req: Request, conn: Connection) -> None:
        path = req.path.partition("?")[0]
        try:
            if path.startswith("/v1/") and self._auth is not None and req.authorization != self._auth:
                conn.send(401, JSON, b'{"error":"Unauthorized"}')
                return
            if req.method == "POST":
                if path == "/v1/chat/completions":
                    self._generate(req, conn, chat=True)
                elif path == "/v1/completions":
                    self._generate(req, conn, chat=False)
                elif path == "/v1/embeddings":
                    self._embeddings(req, conn)
                elif path == "/v1/responses":
                    self._responses(req, conn)
                elif path in _POOLING_ROUTES:
                    self._pooling(path, req, conn)
                elif path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
                    status, body = extras.transcription_body(b"".join(req.body), req.content_type,
                                                             self.models)
                    self.upload_bytes += sum(map(len, req.body))
                    conn.send(status, JSON, body)
                else:
                    self._not_found(path, conn)
            elif req.method == "GET":
                if path in ("/health", "/ping"):
                    conn.send(200, JSON, b"")
                elif path == "/metrics":
                    conn.send(200, CONTENT_TYPE, self.metrics.render())
                elif path == "/v1/models":
                    conn.send(200, JSON, self._models_body())
                elif path == "/version":
                    conn.send(200, JSON, self._version)
                else:
                    self._not_found(path, conn)
            else:
                conn.send(405, JSON, b'{"detail":"Method Not Allowed"}')
        except wire.BadRequestError as exc:
            conn.send(400, JSON, wire.error_json(400, str(exc), "BadRequestError"))

    def _not_found(self, path: str, conn: Connection) -> None:
        conn.send(404, JSON, b'{"detail":"Not Found"}')

    def _check_model(self, model: str | None, conn: Connection) -> str | None:
        if model is None:
            return self.models[0]
        if model in self.models:
            return model
        conn.send(404, JSON, wire.error_json(404, f"The model `{model}` does not exist.", "NotFoundError"))
        return None

    def _generate(self, req: Request, conn: Connection, chat: bool) -> None:
        body = b"".join(req.body)
        if chat:
            creq, prompt_tokens = wire.parse_chat(body)
            max_tokens = creq.max_completion_tokens or creq.max_tokens
            text_seed = body
        else:
            preq, prompt_tokens = wire.parse_completion(body)
            creq, max_tokens, text_seed = preq, preq.max_tokens, body  # type: ignore[assignment]
        if creq.priority != 0 and self.config.scheduling_policy != "priority":
            raise wire.BadRequestError(
                f"Got priority {creq.priority} but Priority scheduling is not enabled.")
        model = self._check_model(creq.model, conn)
        if model is None:
            return
        limit = self.config.max_model_len
        if prompt_tokens >= limit:
            raise wire.BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages.")
        if max_tokens is None:
            max_tokens = limit - prompt_tokens
        elif prompt_tokens + max_tokens > limit:
            raise wire.BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
                f"the completion). Please reduce the length of the messages or completion.")
        if self.engine.blocks_for(prompt_tokens + 1) > self.engine.total_blocks:
            raise wire.BadRequestError(f"prompt of {prompt_tokens} tokens does not fit the KV cache")
        seed = prompt_seed(text_seed.decode("utf-8", "replace"))
        out_len = output_length(seed, max_tokens, creq.ignore_eos, self.config.eos_mean_tokens)
        rid = (req.request_id.decode("latin-1") if req.request_id else uuid.uuid4().hex)
        request_id = ("chatcmpl-" if chat else "cmpl-") + rid
        opts = creq.stream_options
        sink = _Sink(self, conn, chat=chat, stream=bool(creq.stream),
                     include_usage=bool(opts and opts.include_usage), request_id=request_id, model=model,
                     prompt_tokens=prompt_tokens)
        seq = Seq(prompt_tokens, out_len, max_tokens=max_tokens, seed=seed, sink=sink,
                  arrival=asyncio.get_running_loop().time(), priority=creq.priority)
        sink.seq = seq
        if self.engine.prefix_cache is not None:
            seq.prefix = SeqPrefix(_prompt_tokens(creq), seed)
        if creq.stream:
            conn.start_stream()
            self.streams += 1
            every = self.config.fail_after_head_every
            if every and self.streams % every == 0:
                self.faults += 1  # the head is out; the "engine" dies before its first token
                asyncio.get_running_loop().call_later(FAULT_DELAY_S, conn.drop)
                return
        conn.on_disconnect = sink.disconnected
        self.submit(seq)

    def _responses(self, req: Request, conn: Connection) -> None:
        body = b"".join(req.body)
        rreq, prompt_tokens = extras.parse_responses(body)
        model = self._check_model(rreq.model, conn)
        if model is None:
            return
        limit = self.config.max_model_len
        max_tokens = rreq.max_output_tokens or max(1, limit - prompt_tokens)
        if prompt_tokens + max_tokens > limit:
            raise wire.BadRequestError(f"This model's maximum context length is {limit} tokens; the request "
                                       f"has {prompt_tokens} input tokens and asks for {max_tokens} more.")
        seed = prompt_seed(body.decode("utf-8", "replace"))
        out_len = output_length(seed, max_tokens, False, self.config.eos_mean_tokens)
        rid = req.request_id.decode("latin-1") if req.request_id else uuid.uuid4().hex
        sink = _ResponsesSink(self, conn, stream=bool(rreq.stream), rid=rid, model=model,
                              prompt_tokens=prompt_tokens)
        seq = Seq(prompt_tokens, out_len, max_tokens=max_tokens, seed=seed, sink=sink,
                  arrival=asyncio.get_running_loop().time())
        sink.seq = seq
        if rreq.stream:
            conn.start_stream()
        conn.on_disconnect = sink.disconnected
        self.submit(seq)

    def _pooling(self, path: str, req: Request, conn: Connection) -> None:
        """The routes of pooling and scoring models, answered at once (no engine step)."""
        body = b"".join(req.body)
        try:
            model_field = msgspec.json.decode(body, type=_ModelField).model
        except msgspec.DecodeError as exc:
            raise wire.BadRequestError(f"invalid request body: {exc}") from None
        if path == "/tokenize":
            conn.send(200, JSON, extras.tokenize_body(body, self.config.max_model_len))
            return
        if path == "/detokenize":
            conn.send(200, JSON, extras.detokenize_body(body))
            return
        model = self._check_model(model_field, conn)
        if model is None:
            return
        conn.send(200, JSON, _POOLING_ROUTES[path](body, model))

    def _embeddings(self, req: Request, conn: Connection) -> None:
        ereq, counts = wire.parse_embedding(b"".join(req.body))
        model = self._check_model(ereq.model, conn)
        if model is None:
            return
        inp = ereq.input
        inputs: list[object] = [inp] if isinstance(inp, str) or isinstance(inp[0], int) else list(inp)
        data = []
        for i, item in enumerate(inputs):  # a list of token ids is one input
            ids = item if isinstance(item, str) else [t for t in item if isinstance(t, int)]  # type: ignore[attr-defined]
            bag = bag_of_words(ids, EMBEDDING_DIM)
            data.append({"index": i, "object": "embedding", "embedding": bag})
        total = sum(counts)
        conn.send(200, JSON, wire.encode({
            "id": "embd-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": wire.usage_obj(total, 0)}))

    def _models_body(self) -> bytes:
        perm = {"id": "modelperm-sim", "object": "model_permission", "created": self._created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False}
        return wire.encode({"object": "list", "data": [
            {"id": name, "object": "model", "created": self._created, "owned_by": "vllm",
             "root": self.models[0], "parent": None, "max_model_len": self.config.max_model_len,
             "permission": [perm]} for name in self.models]})

    # --- lifecycle -----------------------------------------------------------------------
    async def drain(self, timeout: float) -> bool:
        """Wait (up to ``timeout``) until no generation is waiting or running; True if none is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.engine.has_work() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # shutdown only: a cheap poll of two containers
        return not self.engine.has_work()

    def close_connections(self, abort: bool = True) -> None:
        """Close every connection: ``abort`` drops unsent bytes, otherwise they are sent first."""
        for conn in list(self._conns):
            if conn.transport is not None and not conn.closed:
                if abort:
                    conn.transport.abort()
                else:
                    conn.transport.close()


@contextlib.asynccontextmanager
async def run_simulator(config: SimConfig | None = None) -> AsyncIterator[Simulator]:
    """Serve a simulator in this event loop: ``async with run_simulator(cfg) as sim: sim.port``."""
    sim = Simulator(config or SimConfig(port=0))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(sim.connection, sim.config.host, sim.config.port, backlog=4096)
    sim.port = server.sockets[0].getsockname()[1]
    engine_task = asyncio.create_task(sim.run_engine(), name="sim-engine")
    sim.server = server
    try:
        yield sim
    finally:
        server.close()
        sim.close_connections()
        engine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engine_task
        await server.wait_closed()
