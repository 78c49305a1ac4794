"""vLLM's OpenAI wire format: request views, response bodies and SSE chunk framing (pure).

Shapes follow vLLM's ``entrypoints/openai/protocol.py`` as serialized by its server:
streaming chunks are dumped with ``exclude_unset`` (so a chat delta has no ``usage`` or
``tool_calls`` keys), non-streaming bodies in full. Chunk bytes are built from per-request
prefixes computed once, so a token costs one bytes join, not a JSON encode.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from bench.sim.textgen import TOKEN_JSON, count_tokens


class BadRequestError(Exception):
    """The client's fault: 400 with vLLM's error JSON."""


_T = TypeVar("_T")


# --- requests ---------------------------------------------------------------------------------
class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None


class _Sampling(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = 1
    priority: int = 0  # vLLM's request priority (lower first; needs --scheduling-policy priority)


class ChatRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[str | int | list[int]]


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: str | list[str | int | list[int]]
    model: str | None = None


_dec_chat = msgspec.json.Decoder(ChatRequest)
_dec_completion = msgspec.json.Decoder(CompletionRequest)
_dec_embedding = msgspec.json.Decoder(EmbeddingRequest)


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:  # includes ValidationError
        raise BadRequestError(f"invalid request body: {exc}") from None


def parse_chat(body: bytes) -> tuple[ChatRequest, int]:
    """The request and its prompt token count."""
    req = _decode(_dec_chat, body)
    if not req.messages:
        raise BadRequestError("messages must not be empty")
    total = 0
    for msg in req.messages:
        if isinstance(msg.content, str):
            total += count_tokens(msg.content)
        elif msg.content:
            total += sum(count_tokens(p.text) for p in msg.content if p.text)
    _check_sampling(req, req.max_completion_tokens)
    return req, max(1, total)


def parse_completion(body: bytes) -> tuple[CompletionRequest, int]:
    req = _decode(_dec_completion, body)
    prompt = req.prompt
    if isinstance(prompt, str):
        total = count_tokens(prompt)
    elif not prompt:
        raise BadRequestError("prompt must not be empty")
    elif len(prompt) > 1 and not isinstance(prompt[0], int):
        raise BadRequestError("the simulator serves one prompt per request")
    elif isinstance(prompt[0], str):
        total = count_tokens(prompt[0])
    elif isinstance(prompt[0], list):
        total = len(prompt[0])
    elif all(isinstance(t, int) for t in prompt):
        total = len(prompt)
    else:
        raise BadRequestError("prompt must be a string, a list of token ids, or a list with one of those")
    _check_sampling(req, None)
    return req, max(1, total)


def parse_embedding(body: bytes) -> tuple[EmbeddingRequest, list[int]]:
    """The request and the token count of each input."""
    req = _decode(_dec_embedding, body)
    inp = req.input
    if isinstance(inp, str):
        counts = [count_tokens(inp)]
    elif not inp:
        raise BadRequestError("input must not be empty")
    elif all(isinstance(x, int) for x in inp):
        counts = [len(inp)]
    elif any(isinstance(x, int) for x in inp):
        raise BadRequestError("input must be a string, a list of strings, or token ids")
    else:
        counts = [count_tokens(x) if isinstance(x, str) else len(x) for x in inp]  # type: ignore[arg-type]
    return req, [max(1, c) for c in counts]


def _check_sampling(req: _Sampling, max_completion_tokens: int | None) -> None:
    if req.n != 1:
        raise BadRequestError("the simulator supports n=1 only")
    for name, value in (("max_tokens", req.max_tokens), ("max_completion_tokens", max_completion_tokens)):
        if value is not None and value < 1:
            raise BadRequestError(f"{name} must be at least 1, got {value}.")


# --- errors -----------------------------------------------------------------------------------
_enc = msgspec.json.Encoder()


def error_json(status: int, message: str, type_: str, param: str | None = None) -> bytes:
    """vLLM's ErrorResponse: ``{"object":"error","message":..,"type":..,"param":..,"code":..}``."""
    return _enc.encode({"object": "error", "message": message, "type": type_, "param": param, "code": status})


# --- streaming chunks -------------------------------------------------------------------------
def chunk_frame(payload: bytes) -> bytes:
    """One SSE event in one HTTP/1.1 chunk: ``<hex>\\r\\ndata: ...\\n\\n\\r\\n``."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


DONE_FRAME = chunk_frame(b"[DONE]")
LAST_CHUNK = b"0\r\n\r\n"


class ChunkMaker:
    """Builds the SSE frames of one streaming request from prefixes encoded once."""

    __slots__ = ("_head", "_mid", "_tail", "chat")

    def __init__(self, chat: bool, request_id: str, created: int, model: str) -> None:
        self.chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = b'{"id":%b,"object":"%b","created":%d,"model":%b,"choices":' % (
            _enc.encode(request_id), obj.encode(), created, _enc.encode(model))
        if chat:
            self._mid = b'[{"index":0,"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}'
        else:
            self._mid = b'[{"index":0,"text":'
            self._tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}'

    def role(self) -> bytes:
        """vLLM's first chat chunk: the assistant role with empty content."""
        return chunk_frame(self._head + b'[{"index":0,"delta":{"role":"assistant","content":""},'
                           b'"logprobs":null,"finish_reason":null}]}')

    def token(self, tok: int) -> bytes:
        return chunk_frame(self._head + self._mid + TOKEN_JSON[tok] + self._tail)

    def final_token(self, tok: int, reason: str) -> bytes:
        close = b'},"logprobs":null,"finish_reason":"%b","stop_reason":null}]}' if self.chat else (
            b',"logprobs":null,"finish_reason":"%b","stop_reason":null}]}')
        return chunk_frame(self._head + self._mid + TOKEN_JSON[tok] + close % reason.encode())

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return chunk_frame(self._head + b'[],"usage":{"prompt_tokens":%d,"total_tokens":%d,'
                           b'"completion_tokens":%d}}' % (prompt_tokens, prompt_tokens + completion_tokens,
                                                           completion_tokens))


# --- non-streaming bodies ---------------------------------------------------------------------
def usage_obj(prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def chat_body(*, request_id: str, created: int, model: str, text: str, reason: str,
              prompt_tokens: int, completion_tokens: int) -> bytes:
    return _enc.encode({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "reasoning_content": None, "content": text,
                        "tool_calls": []},
            "logprobs": None, "finish_reason": reason, "stop_reason": None,
        }],
        "usage": usage_obj(prompt_tokens, completion_tokens),
        "prompt_logprobs": None, "kv_transfer_params": None,
    })


def completion_body(*, request_id: str, created: int, model: str, text: str, reason: str,
                    prompt_tokens: int, completion_tokens: int) -> bytes:
    return _enc.encode({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                     "stop_reason": None, "prompt_logprobs": None}],
        "usage": usage_obj(prompt_tokens, completion_tokens),
        "kv_transfer_params": None,
    })


def encode(obj: object) -> bytes:
    return _enc.encode(obj)
