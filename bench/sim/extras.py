"""The simulator's other vLLM routes: Responses API, rerank, score, tokenize, detokenize, pooling,
classify (request views and response bodies, pure; the app wires them).

Shapes follow vLLM's serving of those routes closely enough for the ``openai`` SDK and for
the gateway's accounting: every body that vLLM books tokens for carries a ``usage`` object
(Responses: ``input_tokens``/``output_tokens``; rerank: ``total_tokens`` only; the others:
``prompt_tokens``). A streamed Responses answer is a sequence of ``event: <type>`` +
``data: <json>`` SSE events ending with ``response.completed``, whose ``response.usage`` holds
the counts; there is no ``[DONE]``.
"""

from __future__ import annotations

import math
import time
import uuid

import msgspec

from bench.sim.textgen import WORDS, count_tokens, prompt_seed
from bench.sim.wire import BadRequestError

_enc = msgspec.json.Encoder()


def _decode(cls: type[msgspec.Struct], body: bytes) -> msgspec.Struct:
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"invalid request body: {exc}") from None


def _text_tokens(value: object) -> int:
    """Tokens of a string, a list of strings / token ids, or Responses input items."""
    if isinstance(value, str):
        return count_tokens(value)
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_text_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_tokens(v) for k, v in value.items() if k in ("content", "text"))
    return 0


# --- Responses API ------------------------------------------------------------------------------
class ResponsesRequest(msgspec.Struct, kw_only=True):
    input: str | list[object]
    model: str | None = None
    stream: bool | None = False
    max_output_tokens: int | None = None
    instructions: str | None = None


def parse_responses(body: bytes) -> tuple[ResponsesRequest, int]:
    req = _decode(ResponsesRequest, body)
    assert isinstance(req, ResponsesRequest)
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise BadRequestError(f"max_output_tokens must be at least 1, got {req.max_output_tokens}.")
    tokens = _text_tokens(req.input) + (count_tokens(req.instructions) if req.instructions else 0)
    return req, max(1, tokens)


def _usage(prompt: int, completion: int) -> dict[str, object]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def response_obj(rid: str, model: str, created: int, *, text: str | None, prompt: int, completion: int,
                 ) -> dict[str, object]:
    """A ``response`` object: in progress (``text`` None) or completed with its message."""
    output: list[object] = []
    if text is not None:
        output = [{"id": "msg_" + rid, "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]}]
    return {"id": "resp_" + rid, "object": "response", "created_at": created, "model": model,
            "status": "completed" if text is not None else "in_progress", "output": output,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": 1.0,
            "top_p": 1.0, "incomplete_details": None, "error": None, "instructions": None,
            "metadata": None, "usage": _usage(prompt, completion) if text is not None else None}


def _event(kind: str, payload: dict[str, object]) -> bytes:
    """One SSE event of the Responses stream, in one HTTP/1.1 chunk."""
    data = b"event: %b\ndata: %b\n\n" % (kind.encode(), _enc.encode({"type": kind, **payload}))
    return b"%x\r\n%b\r\n" % (len(data), data)


class ResponsesStream:
    """The events of one streamed Responses answer, numbered in order."""

    __slots__ = ("created", "model", "n", "rid")

    def __init__(self, rid: str, model: str, created: int) -> None:
        self.rid, self.model, self.created = rid, model, created
        self.n = 0

    def _next(self, kind: str, payload: dict[str, object]) -> bytes:
        self.n += 1
        return _event(kind, {"sequence_number": self.n - 1, **payload})

    def start(self) -> bytes:
        return self._next("response.created", {"response": response_obj(self.rid, self.model, self.created,
                                                                         text=None, prompt=0, completion=0)})

    def delta(self, text: str) -> bytes:
        return self._next("response.output_text.delta", {"item_id": "msg_" + self.rid, "output_index": 0,
                                                          "content_index": 0, "delta": text, "logprobs": []})

    def end(self, text: str, prompt: int, completion: int) -> bytes:
        return self._next("response.completed", {"response": response_obj(
            self.rid, self.model, self.created, text=text, prompt=prompt, completion=completion)})


# --- rerank, score ------------------------------------------------------------------------------
class RerankRequest(msgspec.Struct, kw_only=True):
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None


class ScoreRequest(msgspec.Struct, kw_only=True):
    text_1: str | list[str]
    text_2: str | list[str]
    model: str | None = None


def _relevance(a: str, b: str) -> float:
    return 1.0 / (1.0 + math.exp(-((prompt_seed(a + "\x00" + b) % 2001) - 1000) / 250.0))


def rerank_body(body: bytes, model: str) -> bytes:
    req = _decode(RerankRequest, body)
    assert isinstance(req, RerankRequest)
    if not req.documents:
        raise BadRequestError("documents must not be empty")
    results = sorted(({"index": i, "document": {"text": d}, "relevance_score": _relevance(req.query, d)}
                      for i, d in enumerate(req.documents)), key=lambda r: -r["relevance_score"])  # type: ignore[operator]
    if req.top_n is not None and req.top_n > 0:
        results = results[: req.top_n]
    tokens = sum(count_tokens(req.query) + count_tokens(d) for d in req.documents)
    return _enc.encode({"id": "rerank-" + uuid.uuid4().hex, "model": model, "usage": {"total_tokens": tokens},
                        "results": results})


def score_body(body: bytes, model: str) -> bytes:
    req = _decode(ScoreRequest, body)
    assert isinstance(req, ScoreRequest)
    left = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    right = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if not left or not right:
        raise BadRequestError("text_1 and text_2 must not be empty")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise BadRequestError("text_1 and text_2 must have the same length (or text_1 one item)")
    pairs = list(zip(left, right, strict=True))
    data: list[dict[str, object]] = [{"index": i, "object": "score", "score": _relevance(a, b)}
                                     for i, (a, b) in enumerate(pairs)]
    tokens = sum(count_tokens(a) + count_tokens(b) for a, b in pairs)
    return _list_body("score", model, data, tokens)


def _list_body(kind: str, model: str, data: list[dict[str, object]], tokens: int) -> bytes:
    return _enc.encode({"id": f"{kind}-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
                        "model": model, "data": data,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                  "prompt_tokens_details": None}})


# --- tokenize, detokenize -----------------------------------------------------------------------
class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, object]] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


def _word_id(word: str) -> int:
    return WORDS.index(word) if word in WORDS else len(WORDS) + prompt_seed(word) % 100_000


def tokenize_body(body: bytes, max_model_len: int) -> bytes:
    req = _decode(TokenizeRequest, body)
    assert isinstance(req, TokenizeRequest)
    if req.prompt is None and req.messages is None:
        raise BadRequestError("either prompt or messages is required")
    text = req.prompt if req.prompt is not None else " ".join(
        str(m.get("content", "")) for m in req.messages or ())
    tokens = [_word_id(w) for w in text.split()]
    return _enc.encode({"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens,
                        "token_strs": None})


def detokenize_body(body: bytes) -> bytes:
    req = _decode(DetokenizeRequest, body)
    assert isinstance(req, DetokenizeRequest)
    words = [WORDS[t] if 0 <= t < len(WORDS) else f"<{t}>" for t in req.tokens]
    return _enc.encode({"prompt": " ".join(words)})


# --- pooling, classify --------------------------------------------------------------------------
class InputRequest(msgspec.Struct, kw_only=True):
    input: str | list[str] | None = None
    messages: list[dict[str, object]] | None = None
    model: str | None = None


def _inputs(body: bytes) -> list[str]:
    req = _decode(InputRequest, body)
    assert isinstance(req, InputRequest)
    if req.input is not None:
        items = [req.input] if isinstance(req.input, str) else req.input
    elif req.messages is not None:
        items = [" ".join(str(m.get("content", "")) for m in req.messages)]
    else:
        raise BadRequestError("input is required")
    if not items:
        raise BadRequestError("input must not be empty")
    return items


def pooling_body(body: bytes, model: str) -> bytes:
    items = _inputs(body)
    data = [{"index": i, "object": "pooling", "data": [math.sin(prompt_seed(t) % 1000 + k) for k in range(8)]}
            for i, t in enumerate(items)]
    return _list_body("pool", model, data, sum(max(1, count_tokens(t)) for t in items))


LABELS = ("negative", "positive")


def classify_body(body: bytes, model: str) -> bytes:
    items = _inputs(body)
    data = []
    for i, t in enumerate(items):
        p = _relevance(t, "positive")
        probs = [1.0 - p, p]
        data.append({"index": i, "label": LABELS[int(p >= 0.5)], "probs": probs, "num_classes": 2})
    return _list_body("classify", model, data, sum(max(1, count_tokens(t)) for t in items))


# --- audio (multipart) ------------------------------------------------------------------------
def _form(body: bytes, content_type: bytes | None) -> dict[str, tuple[bytes, bool]]:
    """name -> (value, is a file) of a multipart/form-data body."""
    boundary = b""
    for param in (content_type or b"").split(b";")[1:]:
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary":
            boundary = value.strip(b'"')
    if not boundary:
        raise BadRequestError("expected multipart/form-data with a boundary")
    fields: dict[str, tuple[bytes, bool]] = {}
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            raise BadRequestError("malformed multipart part")
        name = head.partition(b'name="')[2].partition(b'"')[0].decode()
        fields[name] = (value.removesuffix(b"\r\n"), b"filename=" in head)
    return fields


def transcription_body(body: bytes, content_type: bytes | None, models: tuple[str, ...]) -> tuple[int, bytes]:
    """(status, body) of ``/v1/audio/transcriptions`` or ``translations``: the text names the
    audio's size and digest (so a test sees the upload arrived intact); usage in seconds."""
    fields = _form(body, content_type)
    model = fields.get("model", (b"", False))[0].decode()
    if model not in models:
        return 404, _enc.encode({"object": "error", "message": f"The model `{model}` does not exist.",
                                 "type": "NotFoundError", "param": None, "code": 404})
    audio, is_file = fields.get("file", (b"", False))
    if not is_file or not audio:
        raise BadRequestError("a non-empty 'file' part is required")
    digest = prompt_seed(audio.decode("latin-1"))
    seconds = max(1, len(audio) // 32_000)  # 16 kHz, 16-bit mono
    text = f"heard {len(audio)} bytes, digest {digest:016x}"
    return 200, _enc.encode({"text": text, "usage": {"type": "duration", "seconds": seconds}})


__all__ = ["ResponsesStream", "classify_body", "detokenize_body", "parse_responses", "pooling_body",
           "rerank_body", "response_obj", "score_body", "tokenize_body", "transcription_body"]
