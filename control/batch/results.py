"""Turning one engine answer (or failure) into a line of the output or error file (pure).

OpenAI's format: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``. A 2xx answer goes to the output file; any other status after the runner's retries,
to the error file with its status and body; a request that got no answer at all, to the error
file with ``response: null`` and an ``error``. Lines that never ran because the batch expired
are written to the error file as ``batch_expired``.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from control.batch.wire import LineError, LineResponse, OutputLine

_encode = msgspec.json.Encoder().encode


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


_decode_usage = msgspec.json.Decoder(_WithUsage).decode


class LineResult(NamedTuple):
    ok: bool
    line: bytes  # the output or error file's line, without the newline
    prompt_tokens: int
    completion_tokens: int


def answered(line_id: str, custom_id: str, status: int, request_id: str, body: bytes) -> LineResult:
    try:
        raw = msgspec.Raw(body) if body.strip() else msgspec.Raw(b"null")
        msgspec.json.decode(raw)  # a body that is not JSON is kept as a JSON string
    except msgspec.DecodeError:
        raw = msgspec.Raw(_encode(body.decode("utf-8", "replace")))
    ok = 200 <= status < 300
    prompt = completion = 0
    if ok:
        try:
            usage = _decode_usage(body).usage
        except msgspec.DecodeError:
            usage = None
        if usage is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
    line = OutputLine(
        id=line_id,
        custom_id=custom_id,
        response=LineResponse(status_code=status, request_id=request_id, body=raw),
        error=None,
    )
    return LineResult(ok, _encode(line), prompt, completion)


def unanswered(line_id: str, custom_id: str, code: str, message: str) -> LineResult:
    line = OutputLine(
        id=line_id, custom_id=custom_id, response=None, error=LineError(code=code, message=message)
    )
    return LineResult(False, _encode(line), 0, 0)
