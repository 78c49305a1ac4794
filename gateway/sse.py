"""Sans-IO scanning of an OpenAI server-sent-event stream for its usage chunk.

The relay forwards SSE bytes as they arrive; :class:`SseScanner` only finds event boundaries
(``\\n\\n``) so that the final usage event can be read (exact token counts) and, when the gateway
asked for usage on the client's behalf, removed. Cost on the hot path: an ``endswith`` and a
substring search per upstream read; events are split only when a read contains ``"usage"``.
Invariants: bytes are forwarded in order and unchanged except a stripped usage event; a partial
event at the end of a read is held until its end arrives (at most ``MAX_EVENT`` bytes; beyond
that scanning stops and everything passes through).
"""

from __future__ import annotations

import msgspec

MAX_EVENT = 1 << 20
_SEP = b"\n\n"
_DATA = b"data: "


class Usage(msgspec.Struct):
    """A ``usage`` object in any of vLLM's shapes: chat/completions/embeddings/score/pooling
    (``prompt_tokens``, ``completion_tokens``), Responses (``input_tokens``, ``output_tokens``),
    rerank (``total_tokens`` only: all of it is prompt)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    def counts(self) -> tuple[int, int]:
        """(prompt, completion) tokens."""
        if self.prompt_tokens or self.completion_tokens:
            return self.prompt_tokens, self.completion_tokens
        if self.input_tokens or self.output_tokens:
            return self.input_tokens, self.output_tokens
        return self.total_tokens, 0


class _ResponseUsage(msgspec.Struct):
    usage: Usage | None = None


class UsageView(msgspec.Struct):
    usage: Usage | None = None
    choices: list[msgspec.Raw] | None = None
    response: _ResponseUsage | None = None  # a Responses API event (response.completed)

    def found(self) -> Usage | None:
        if self.usage is not None:
            return self.usage
        return self.response.usage if self.response is not None else None


decode_usage_view = msgspec.json.Decoder(UsageView).decode


def usage_of(body: bytes) -> Usage | None:
    """The ``usage`` object of a complete (non-streaming) JSON response, if any."""
    try:
        return decode_usage_view(body).usage
    except msgspec.DecodeError:
        return None


_EVENT = b"event: "


class SseScanner:
    __slots__ = ("_passthrough", "_tail", "data_events", "strip_usage", "usage")

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self.data_events = 0  # "data: " events seen, [DONE] and the usage event included
        self._tail = b""
        self._passthrough = False

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward now for ``data`` (possibly b"", while a partial event is held)."""
        if self.strip_usage and not self._tail and data.endswith(_SEP) and b'"usage"' not in data:
            return data  # the common case: whole events, nothing to take out, nothing to count
        if self._passthrough:
            return data
        if self._tail:
            data = self._tail + data
            self._tail = b""
        if not data.endswith(_SEP):
            cut = data.rfind(_SEP)
            if cut < 0:
                if len(data) > MAX_EVENT:
                    self._passthrough = True
                    return data
                self._tail = data
                return b""
            self._tail = data[cut + 2:]
            data = data[: cut + 2]
        if not self.strip_usage:  # the gateway asked for usage itself: no need for the fallback count
            self.data_events += data.count(_DATA)
        if b'"usage"' in data:
            data = self._take_usage(data)
        return data

    @property
    def pristine(self) -> bool:
        """Nothing held and still scanning: the C relay can carry on from here."""
        return not self._tail and not self._passthrough

    def flush(self) -> bytes:
        """At the end of the stream: whatever partial event is still held."""
        tail, self._tail = self._tail, b""
        return tail

    def _take_usage(self, data: bytes) -> bytes:
        """Read (and maybe cut out) the events of ``data`` that mention "usage"; others untouched."""
        pos = 0
        while (hit := data.find(b'"usage"', pos)) >= 0:
            start = data.rfind(_SEP, 0, hit)
            start = 0 if start < 0 else start + 2
            end = data.find(_SEP, hit)
            end = len(data) if end < 0 else end + 2
            pos = end
            event = data[start:end]
            if event.startswith(_EVENT):  # the Responses API names each event on a line before its data
                event = event[event.find(b"\n") + 1:]
            if not event.startswith(_DATA):
                continue
            try:
                view = decode_usage_view(event[len(_DATA):].rstrip(b"\n"))
            except msgspec.DecodeError:
                continue
            usage = view.found()
            if usage is not None:
                self.usage = usage
                if self.strip_usage and view.usage is not None and not view.choices:
                    data = data[:start] + data[end:]
                    pos = start
        return data

    @property
    def content_events(self) -> int:
        """Events that carried content: a fallback token count when no usage was reported.

        Counted only for clients that set ``stream_options`` themselves (then the engine may not
        report usage); when the gateway injected ``include_usage`` the engine reports it.
        """
        extra = 1 if self.usage is not None else 0
        return max(0, self.data_events - 1 - extra)
