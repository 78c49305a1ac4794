"""A small synchronous HTTP client of the admin API (``hpcgate admin`` and scripts).

Invariants: every call sends the admin token and JSON, decodes the answer into the wire type
the server declares for that route, and turns any non-2xx answer into :class:`AdminApiError`
carrying the server's :class:`control.wire.ErrorBody`; a network failure is an
:class:`AdminApiError` with status 0. Path segments are percent-encoded (model names contain
``/``). A CLI, one request at a time: a synchronous httpx client
(:func:`control.http_client.tool_client`).
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from control.http_client import tool_client
from control.wire import ErrorBody

T = TypeVar("T")


class AdminApiError(Exception):
    def __init__(self, status: int, body: ErrorBody) -> None:
        super().__init__(f"{status} {body.error}: {body.message}")
        self.status = status
        self.body = body


def seg(value: str | int) -> str:
    """One path segment, percent-encoded (``/`` included)."""
    return quote(str(value), safe="")


class AdminClient:
    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout_s

    def raw(self, method: str, path: str, body: object = None, query: dict[str, Any] | None = None) -> bytes:
        """The answer body of a 2xx; raises AdminApiError otherwise."""
        params = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        data = None if body is None else msgspec.json.encode(body)
        headers = {"authorization": f"Bearer {self._token}", "accept": "application/json"}
        if data is not None:
            headers["content-type"] = "application/json"
        try:
            with tool_client(self._timeout) as client:
                response = client.request(method, self._base + path, params=params, content=data,
                                          headers=headers)
        except httpx.HTTPError as exc:
            message = f"{self._base}: {str(exc) or type(exc).__name__}"
            raise AdminApiError(0, ErrorBody(error="unreachable", message=message)) from None
        if response.is_success:
            return response.content
        try:
            error = msgspec.json.decode(response.content, type=ErrorBody)
        except msgspec.DecodeError:
            text = response.content.decode(errors="replace")[:200]
            error = ErrorBody(error="http_error", message=text or response.reason_phrase)
        raise AdminApiError(response.status_code, error)

    def call(
        self, cls: type[T], method: str, path: str, body: object = None, query: dict[str, Any] | None = None
    ) -> T:
        return msgspec.json.decode(self.raw(method, path, body, query), type=cls)


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
