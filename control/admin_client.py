"""A small synchronous HTTP client of the admin API (``hpcgate admin`` and scripts).

Invariants: every call sends the admin token and JSON, decodes the answer into the wire type
the server declares for that route, and turns any non-2xx answer into :class:`AdminApiError`
carrying the server's :class:`control.wire.ErrorBody`; a network failure is an
:class:`AdminApiError` with status 0. Path segments are percent-encoded (model names contain
``/``). Standard library only (urllib): this is a CLI, one request at a time.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import msgspec

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
        url = self._base + path
        params = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urlencode(params)
        data = None if body is None else msgspec.json.encode(body)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                payload: bytes = response.read()
                return payload
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                error = msgspec.json.decode(text, type=ErrorBody)
            except msgspec.DecodeError:
                error = ErrorBody(
                    error="http_error", message=text.decode(errors="replace")[:200] or exc.reason
                )
            raise AdminApiError(exc.code, error) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminApiError(
                0, ErrorBody(error="unreachable", message=f"{self._base}: {reason}")
            ) from None

    def call(
        self, cls: type[T], method: str, path: str, body: object = None, query: dict[str, Any] | None = None
    ) -> T:
        return msgspec.json.decode(self.raw(method, path, body, query), type=cls)


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
