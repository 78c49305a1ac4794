"""A strict, sans-IO reader of the gateway's HTTP/1.1 responses, for tests that must not be lenient.

Feed it the bytes a client received, in any split; it returns each response once it is complete
and raises :class:`FramingError` at the first byte that breaks the framing the gateway
promises: a status line ``HTTP/1.1 NNN reason``, ``name: value`` header lines ending in CRLF, exactly
one of ``content-length`` and ``transfer-encoding: chunked``, chunk-size lines of bare hex (the
gateway writes no extensions) each followed by exactly that many bytes and CRLF, and a last chunk
``0\\r\\n\\r\\n`` without trailers. Pipelined responses follow one another in the same stream.

Invariants: bytes are consumed in order and never re-read; :attr:`ResponseParser.in_message` is
true exactly while a response has begun and is not complete, so a close seen there is a
truncation. :func:`sse_events` holds a stream's body to the same standard: whole ``data: `` events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_STATUS = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*\Z")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e]*?)[ \t]*\Z")
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}\Z")
_SINGLE = (b"content-length", b"transfer-encoding", b"content-type", b"connection")


class FramingError(Exception):
    """The server's bytes are not a well-formed response at this point."""


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]  # names lowercased; a repeated name is a violation
    chunked: bool
    body: bytes = b""
    chunks: int = 0  # data chunks (not counting the last chunk)

    @property
    def closes(self) -> bool:
        """The server announced it closes the connection after this response."""
        return self.headers.get(b"connection", b"").lower() == b"close"


@dataclass
class ResponseParser:
    max_head: int = 16 * 1024
    _buf: bytearray = field(default_factory=bytearray)
    _state: str = "head"  # head | length | size | data | data_end | end
    _remain: int = 0
    _current: Response | None = None
    _body: list[bytes] = field(default_factory=list)
    received: int = 0  # bytes fed so far

    @property
    def in_message(self) -> bool:
        return self._current is not None or bool(self._buf)

    def feed(self, data: bytes) -> list[Response]:
        """Consume ``data``; return the responses it completed, in order."""
        self.received += len(data)
        self._buf += data
        done: list[Response] = []
        while self._buf:
            if not self._step(done):
                break
        return done

    def _step(self, done: list[Response]) -> bool:
        """Advance by one framing element; False when more bytes are needed."""
        buf = self._buf
        state = self._state
        if state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise FramingError(f"no end of head within {self.max_head} bytes")
                self._check_partial_head(bytes(buf))
                return False
            head = bytes(buf[:end])
            del buf[:end + 4]
            self._current = self._parse_head(head)
            if self._current.chunked:
                self._state = "size"
            else:
                self._remain = int(self._current.headers[b"content-length"])
                self._state = "length"
                if self._remain == 0:
                    self._complete(done)
            return True
        if state in ("length", "data"):
            take = min(self._remain, len(buf))
            self._body.append(bytes(buf[:take]))
            del buf[:take]
            self._remain -= take
            if self._remain:
                return False
            if state == "length":
                self._complete(done)
            else:
                self._state = "data_end"
            return True
        if state == "size":
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 16 or not _HEX.match(bytes(buf).rstrip(b"\r")):
                    raise FramingError(f"bad chunk-size line {bytes(buf[:40])!r}")
                return False
            line = bytes(buf[:end])
            del buf[:end + 2]
            if not _HEX.match(line):
                raise FramingError(f"bad chunk-size line {line[:40]!r}")
            self._remain = int(line, 16)
            if self._remain:
                assert self._current is not None
                self._current.chunks += 1
                self._state = "data"
            else:
                self._state = "end"
            return True
        # data_end or end: exactly CRLF
        if len(buf) < 2:
            if buf[:1] != b"\r":
                raise FramingError(f"expected CRLF after {state}, got {bytes(buf)!r}")
            return False
        if buf[:2] != b"\r\n":
            what = "chunk data" if state == "data_end" else "the last chunk (no trailers)"
            raise FramingError(f"expected CRLF after {what}, got {bytes(buf[:40])!r}")
        del buf[:2]
        if state == "end":
            self._complete(done)
        else:
            self._state = "size"
        return True

    @staticmethod
    def _check_partial_head(head: bytes) -> None:
        """A head still arriving must already start like one (a bare chunk fails here)."""
        first = head.split(b"\r\n", 1)[0]
        code = first[9:12]
        if first[:9] != b"HTTP/1.1 "[:len(first[:9])] or (code and not code.isdigit()):
            raise FramingError(f"not a status line: {first[:40]!r}")

    @staticmethod
    def _parse_head(head: bytes) -> Response:
        lines = head.split(b"\r\n")
        if any(b"\n" in ln or b"\r" in ln for ln in lines):
            raise FramingError(f"bare CR or LF in the head {head[:80]!r}")
        m = _STATUS.match(lines[0])
        if m is None:
            raise FramingError(f"not a status line: {lines[0][:80]!r}")
        headers: dict[bytes, bytes] = {}
        for ln in lines[1:]:
            h = _HEADER.match(ln)
            if h is None:
                raise FramingError(f"bad header line {ln[:80]!r}")
            name = h.group(1).lower()
            if name in headers and name in _SINGLE:
                raise FramingError(f"repeated header {name!r}")
            headers[name] = h.group(2)
        te = headers.get(b"transfer-encoding")
        cl = headers.get(b"content-length")
        if te is not None and cl is not None:
            raise FramingError("both content-length and transfer-encoding")
        if te is not None and te.lower() != b"chunked":
            raise FramingError(f"transfer-encoding {te!r}")
        if te is None and (cl is None or not cl.isdigit()):
            raise FramingError(f"no usable framing (content-length {cl!r})")
        return Response(int(m.group(1)), headers, te is not None)

    def _complete(self, done: list[Response]) -> None:
        response = self._current
        assert response is not None
        response.body = b"".join(self._body)
        self._body.clear()
        self._current = None
        self._state = "head"
        done.append(response)


def sse_events(body: bytes) -> list[bytes]:
    """A stream's body as its events, each ``data: ...\\n\\n``; raises on anything else."""
    if not body:
        return []
    if not body.endswith(b"\n\n"):
        raise FramingError(f"the stream ends inside an event: ...{body[-60:]!r}")
    events = [e + b"\n\n" for e in body[:-2].split(b"\n\n")]
    for e in events:
        if not e.startswith(b"data: ") or b"\n" in e[:-2]:
            raise FramingError(f"not a data event: {e[:80]!r}")
    return events
