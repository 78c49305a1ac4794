"""A multipart upload (audio transcription, translation) relayed to the engine as it arrives.

The server hands the request out when its head is complete (``Request.upload``, see
:mod:`gateway.http_parse`). :class:`UploadCall` reads the body's first bytes until the form
field ``model`` has ended (:mod:`gateway.multipart`), authenticates, routes and admits as for a
JSON request, then writes the head, those bytes and the rest of the body to the engine piece
by piece: it reads the client only as fast as the engine's socket takes the bytes (both sides
pause), so the gateway holds at most a few hundred KiB of any upload, whatever its size
(``max_upload_bytes``, default 100 MiB; JSON bodies keep ``max_body_bytes``). The body is
forwarded unchanged, but for a model named by alias, whose field is set to the canonical name.

Always on the slow path (a task): it awaits the client's bytes. No retry on another endpoint:
the bytes sent are gone, so an engine failure is a 502. A read of the client that waits
longer than ``request_read_timeout_s`` is a 408. The answer (JSON) is relayed and booked like
any non-streaming answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from gateway.balancer import choose
from gateway.errors import ApiError
from gateway.http_parse import Request, Upload
from gateway.multipart import boundary_of, model_field
from gateway.proxy import ProxyCall, upstream_error
from gateway.relay import FINAL, Exchange
from gateway.tenant_limits import estimate_tokens
from gateway.upstream_client import UpstreamConnection, UpstreamError, build_upload_head

UPLOAD_PATHS = frozenset({b"/v1/audio/transcriptions", b"/v1/audio/translations"})


class UploadCall(ProxyCall):
    __slots__ = ()

    def begin(self, req: Request) -> Coroutine[Any, Any, None]:
        self.in_task = True  # the connection calls request_done when the task ends
        self.kind = "audio"
        return self._upload(req)

    async def _upload(self, req: Request) -> None:
        try:
            await self._relay(req)
        except ApiError as exc:
            self._reply_error(exc)
        except UpstreamError as exc:
            self._reply_error(upstream_error(exc))
        except ConnectionResetError:
            pass  # the client left during the upload (499); the engine's request is aborted
        finally:
            self._finish()

    async def _read(self, upload: Upload) -> bytes:
        try:
            async with asyncio.timeout(self.gw.settings.request_read_timeout_s):
                return await upload.read()
        except TimeoutError:
            raise ApiError(408, "the upload stalled", "request_timeout") from None

    async def _relay(self, req: Request) -> None:
        gw = self.gw
        upload = req.upload
        assert upload is not None
        principal = gw.authenticate(req, self.conn)
        self.tenant, self.tenant_id = principal.name, principal.tenant_id
        ctype = req.headers.get(b"content-type")
        boundary = boundary_of(ctype)
        assert ctype is not None
        prefix = b""
        while (name := model_field(prefix, boundary)) is None:
            piece = await self._read(upload)
            if not piece:
                raise ApiError(400, "missing required form field 'model'", "invalid_body", "model")
            prefix += piece  # at most MAX_PREFIX and one piece
        route = self._route(principal, name, "audio")
        if principal.limited:
            estimate = estimate_tokens(0, None, gw.settings.tpm_completion_estimate, route.max_model_len)
            self.tstate = gw.limits.admit(principal, route.name, gw.loop.time(), estimate)
        length_header = req.headers.get(b"content-length")
        length = int(length_header) if length_header is not None and length_header.isdigit() else None
        if name != route.name:  # by alias: the engine serves the canonical name
            field = b'name="model"\r\n\r\n' + name.encode()
            fixed = prefix.replace(field, b'name="model"\r\n\r\n' + route.name.encode(), 1)
            if length is not None:
                length += len(fixed) - len(prefix)
            prefix = fixed
        chunked = length is None
        up = await self._connect()
        ex = Exchange(gw.loop, self.conn, None, gw.settings.max_response_bytes, False, owner=None,
                      offloader=None)
        self.exchange = ex
        ex.upstream = up
        self.conn.listener = ex
        backend = self.backend
        assert backend is not None
        up.send(build_upload_head(self.path, backend.host_header, backend.auth_line, ctype, length,
                                  request_id=self.rid) + _frame(prefix, chunked), ex)
        while ex.phase not in FINAL:  # the engine may answer (an error) before the body ends
            await up.drain()
            piece = await self._read(upload)
            if not piece:
                if chunked:
                    up.write(b"0\r\n\r\n")
                break
            up.write(_frame(piece, chunked))
        await ex.wait_done()
        self._respond(ex)  # an engine failure: 502/504 (no retry: the bytes sent are gone)

    async def _connect(self) -> UpstreamConnection:
        """An upstream connection to the best backend (waiting in the model's queue if all are
        saturated); a connect failure tries the next backend (nothing was sent yet)."""
        gw = self.gw
        s = gw.settings
        route = self.route
        assert route is not None
        while True:
            backend = choose(route.backends, gw.loop.time(), stale_after=gw.stale_after,
                             max_inflight=s.endpoint_max_inflight, exclude=self.tried)
            if backend is None:
                if self.tried:
                    raise upstream_error(self.last)
                await gw.queues.wait(route.name, s.queue_max, s.queue_timeout_s)
                continue
            self._count(backend)
            try:
                return await backend.pool.open()
            except UpstreamError as exc:
                self._attempt_failed(exc, 0, reused=False)


def _frame(data: bytes, chunked: bool) -> bytes:
    if not chunked or not data:
        return data
    return b"%x\r\n%b\r\n" % (len(data), data)
