"""The few fields of a client's JSON body the gateway reads; the body itself is forwarded as is.

One decoder built at import reads ``model``, ``stream``, ``stream_options`` and keeps the
required payload field (``messages``, ``prompt`` or ``input``) as raw JSON, only checked for its
type; everything else is skipped by msgspec without building objects.
"""

from __future__ import annotations

import msgspec

from gateway.errors import ApiError


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class RequestView(msgspec.Struct):
    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    messages: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_decode = msgspec.json.Decoder(RequestView).decode

# endpoint kind -> (required field, allowed first bytes of its JSON value, description)
_REQUIRED: dict[str, tuple[str, frozenset[int], str]] = {
    "chat": ("messages", frozenset(b"["), "an array of messages"),
    "completions": ("prompt", frozenset(b'"['), "a string or an array"),
    "embeddings": ("input", frozenset(b'"['), "a string or an array"),
}


def parse_view(kind: str, body: bytes) -> RequestView:
    """Decode the routing fields; 400 with a reason for anything malformed."""
    if not body:
        raise ApiError(400, "request body is empty: expected a JSON object", "invalid_body")
    try:
        view = _decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc}", "invalid_body", _param(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
    except UnicodeDecodeError as exc:  # well-formed JSON whose string holds bytes that are not UTF-8
        raise ApiError(400, f"request body is not valid UTF-8 at byte {exc.start}", "invalid_json") from None
    if not view.model:
        raise ApiError(400, "'model' must be a non-empty string", "invalid_body", "model")
    field, first, what = _REQUIRED[kind]
    raw = getattr(view, field)
    if raw is msgspec.UNSET:
        raise ApiError(400, f"missing required field '{field}'", "invalid_body", field)
    if memoryview(raw)[0] not in first:  # raw JSON is never empty; no copy of the payload
        raise ApiError(400, f"'{field}' must be {what}", "invalid_body", field)
    if view.stream and kind == "embeddings":
        raise ApiError(400, "embeddings cannot be streamed", "invalid_body", "stream")
    return view


def _param(message: str) -> str | None:
    for name in ("model", "stream_options", "stream", "max_tokens", "messages", "prompt", "input"):
        if f"`{name}`" in message or f"$.{name}" in message:
            return name
    return None
