"""The few fields of a client's JSON body the gateway reads, and the two edits it makes to it.

One decoder built at import reads ``model``, ``stream``, ``stream_options``, the token caps and
keeps the payload fields a path requires (``messages``, ``prompt``, ``input``, ``query`` and
``documents``, ``text_1`` and ``text_2``, ``tokens``; :data:`REQUIRED`) as raw JSON, only checked
for their type; everything else is skipped by msgspec without building objects. The body is forwarded as
is but for two edits, each decoding only the top level and keeping every other value's bytes:
``model`` set to the canonical name for a request by alias (:func:`with_model`), and
``stream_options.include_usage`` set for a stream whose client did not ask for usage
(:func:`ask_for_usage`).
"""

from __future__ import annotations

import msgspec

from gateway.errors import ApiError


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class RequestView(msgspec.Struct):
    model: str
    stream: bool | None = None
    stream_options: StreamOptions | msgspec.UnsetType | None = msgspec.UNSET  # UNSET: absent, None: null
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # chat's newer name for max_tokens
    max_output_tokens: int | None = None  # the Responses API's
    n: int | None = None  # choices per request: each generates up to the cap
    messages: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    query: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    documents: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    text_1: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    text_2: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    tokens: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET

    def completion_cap(self) -> int | None:
        """The most tokens the client lets the model generate (over all ``n`` choices), if it said."""
        for cap in (self.max_tokens, self.max_completion_tokens, self.max_output_tokens):
            if cap is not None:
                return cap * self.n if self.n is not None and self.n > 1 else cap
        return None

    def payload_bytes(self) -> int:
        """The size of the JSON the model reads (the token estimate's prompt part)."""
        return sum(len(v) for v in (self.messages, self.prompt, self.input, self.query, self.documents,
                                    self.text_1, self.text_2, self.tokens) if v is not msgspec.UNSET)


_decode = msgspec.json.Decoder(RequestView).decode

_STR_OR_ARRAY = frozenset(b'"[')
_ARRAY = frozenset(b"[")
# endpoint kind -> its required fields, each (names of which one must be present, allowed first
# bytes of its JSON value, description)
REQUIRED: dict[str, tuple[tuple[tuple[str, ...], frozenset[int], str], ...]] = {
    "chat": ((("messages",), _ARRAY, "an array of messages"),),
    "completions": ((("prompt",), _STR_OR_ARRAY, "a string or an array"),),
    "embeddings": ((("input",), _STR_OR_ARRAY, "a string or an array"),),
    "responses": ((("input",), _STR_OR_ARRAY, "a string or an array of input items"),),
    "rerank": ((("query",), frozenset(b'"{'), "a string"), (("documents",), _ARRAY, "an array")),
    "score": ((("text_1",), _STR_OR_ARRAY, "a string or an array"),
              (("text_2",), _STR_OR_ARRAY, "a string or an array")),
    "tokenize": ((("prompt", "messages"), _STR_OR_ARRAY, "a string or an array"),),
    "detokenize": ((("tokens",), _ARRAY, "an array of token ids"),),
    "pooling": ((("input", "messages"), _STR_OR_ARRAY, "a string or an array"),),
    "classify": ((("input",), _STR_OR_ARRAY, "a string or an array"),),
}
STREAMABLE = frozenset({"chat", "completions", "responses"})
GENERATES = STREAMABLE  # kinds whose answer is generated text (a completion to reserve tokens for)


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
    for names, first, what in REQUIRED[kind]:
        for field in names:
            raw = getattr(view, field)
            if raw is not msgspec.UNSET:
                break
        else:
            which = " or ".join(f"'{n}'" for n in names)
            raise ApiError(400, f"missing required field {which}", "invalid_body", names[0])
        if memoryview(raw)[0] not in first:  # raw JSON is never empty; no copy of the payload
            raise ApiError(400, f"'{field}' must be {what}", "invalid_body", field)
    if view.stream and kind not in STREAMABLE:
        raise ApiError(400, f"{kind} cannot be streamed", "invalid_body", "stream")
    return view


def _param(message: str) -> str | None:
    for name in ("model", "stream_options", "stream", "max_tokens", "max_completion_tokens",
                 "max_output_tokens", "n", "messages", "prompt", "input", "query", "documents", "text_1",
                 "text_2", "tokens"):
        if f"`{name}`" in message or f"$.{name}" in message:
            return name
    return None


_encode = msgspec.json.Encoder().encode
_decode_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_TRUE = msgspec.Raw(b"true")


def with_model(body: bytes, name: str) -> bytes:
    """The body with ``model`` set to the canonical name (the engine serves that name)."""
    doc = _decode_object(body)
    doc["model"] = msgspec.Raw(_encode(name))
    return _encode(doc)


def ask_for_usage(body: bytes, has_stream_options: bool) -> bytes:
    """The body of a streaming request with ``stream_options.include_usage`` set to true, so the
    engine reports exact token counts whatever the client asked (the gateway then strips the
    usage event from the client's stream when the client did not ask for it).

    Without ``stream_options`` (the common case) the key is inserted without decoding the body;
    with one (null, ``{}``, ``include_usage`` false or null) the top level is decoded to raw
    values and ``stream_options`` rebuilt with its other options kept.
    """
    if not has_stream_options:
        i = body.find(b"{")
        return body[: i + 1] + b'"stream_options":{"include_usage":true},' + body[i + 1:]
    doc = _decode_object(body)
    raw = doc.get("stream_options")
    try:
        options = _decode_object(raw) if raw is not None else {}
    except msgspec.DecodeError:  # null (anything else failed the request view already)
        options = {}
    options["include_usage"] = _TRUE
    doc["stream_options"] = msgspec.Raw(_encode(options))
    return _encode(doc)
