"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``.

:class:`ApiError` is raised anywhere before a response starts; the server turns it into a
complete JSON response with the given status. Bodies are encoded once per error, never by hand.
"""

from __future__ import annotations

import msgspec


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


_encode = msgspec.json.Encoder().encode

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """A request failed before its response started; ``status`` and the JSON body describe why."""

    __slots__ = ("code", "param", "retry_after", "status")

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self.args[0])

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return _encode(ErrorBody(ErrorDetail(message, kind, param, code)))


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """The final event of a stream that failed after its first byte: ``data: {"error": ...}``."""
    return b"data: " + _encode(ErrorBody(ErrorDetail(message, "upstream_error", None, code))) + b"\n\n"
