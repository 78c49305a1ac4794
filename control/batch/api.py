"""``/v1/files`` and ``/v1/batches`` of the control API: OpenAI's Files and Batch APIs.

Clients reach these routes through the gateway's port: the gateway authenticates the API key
from its in-memory table and relays the request as a stream, adding the tenant's id and the
deployment's internal token (``x-hpcgate-internal-token``); a request without the right token
is refused here (401), so the tenant header is believed only from a gateway. Errors are
OpenAI-shaped (``{"error": {"message", "type", "code", "param"}}``); another tenant's id is
404, never 403.

Uploads are parsed as they arrive by ``multipart``'s push parser (Litestar's own ``form()``
reads the whole body first) and written to the file store in chunks; the upload limit is
enforced while streaming (413), so no request holds a whole file in memory.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.exceptions import HTTPException
from litestar.params import PathParameter
from litestar.response import File
from multipart import MultipartError, PushMultipartParser, parse_options_header  # type: ignore[import-untyped]

from control.batch import store
from control.batch.filestore import FileStore
from control.batch.wire import BATCH_ENDPOINTS, BatchCreate, FileDeleted
from control.settings import ApiSettings
from control.store.db import Database

_decode_create = msgspec.json.Decoder(BatchCreate).decode
_WINDOW = re.compile(r"^([1-9][0-9]{0,4})h$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
IdPath = Annotated[str, PathParameter(max_length=256)]
_MAX_FIELD = 256  # bytes of a non-file form field (purpose)
# An upload is written to disk in pieces of about this size, each in a thread: on a shared
# filesystem a write (and the final fsync) can block for long, never on the API's event loop.
_WRITE_PIECE = 1 << 20


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def _error_response(status: int, message: str, code: str, param: str | None = None) -> Response[Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    return Response(body, status_code=status, media_type="application/json")


def _openai_error(_: Request[Any, Any, Any], exc: OpenAIError) -> Response[Any]:
    return _error_response(exc.status, str(exc), exc.code, exc.param)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if exc.status_code == 413:
        return _error_response(413, "request body too large", "file_too_large")
    return _error_response(exc.status_code, str(exc.detail), "invalid_request")


def _not_found(what: str, ident: str) -> OpenAIError:
    return OpenAIError(404, f"No such {what}: '{ident}'", "not_found", "id")


def batch_router(db: Database, settings: ApiSettings) -> Router:
    files = FileStore(settings.batch_dir)
    token = settings.internal_token.encode()
    upload_limit = settings.files_max_bytes + 64 * 1024  # the form's own bytes around the file

    def tenant_of(request: Request[Any, Any, Any]) -> int:
        given = request.headers.get("x-hpcgate-internal-token", "").encode()
        tenant = request.headers.get("x-hpcgate-tenant-id", "")
        if not token or not hmac.compare_digest(given, token) or not tenant.isdigit():
            raise OpenAIError(401, "the Files and Batch APIs are served through the gateway", "unauthorized")
        return int(tenant)

    def checked_id(ident: str, what: str) -> str:
        if not _ID.match(ident):
            raise _not_found(what, ident)
        return ident

    @post("/files", status_code=200, request_max_body_size=upload_limit)
    async def upload_file(request: Request[Any, Any, Any]) -> Response[Any]:
        tenant = tenant_of(request)
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        if ctype != "multipart/form-data" or not options.get("boundary"):
            raise OpenAIError(415, "upload a file as multipart/form-data", "unsupported_media_type")
        async with db.transaction() as conn:
            quota_left = settings.tenant_max_stored_bytes - await store.stored_bytes(conn, tenant)
        file_id = store.new_id("file-")
        tmp, fh = await asyncio.to_thread(files.begin, tenant, file_id)
        committed = False
        try:
            filename, purpose, size = await _receive_form(
                request, options["boundary"], fh, settings.files_max_bytes, quota_left
            )
            if purpose != "batch":
                raise OpenAIError(400, "purpose must be 'batch'", "invalid_purpose", "purpose")
            if filename is None:
                raise OpenAIError(400, "the form has no 'file' part", "missing_file", "file")
            await asyncio.to_thread(files.commit, tmp, fh, tenant, file_id)
            committed = True
            async with db.transaction() as conn:
                # Concurrent uploads each passed the quota left at their start: the last word is
                # here, one tenant's inserts in turn, counting what is stored now.
                await store.lock_tenant(conn, store.FILE_QUOTA_LOCK, tenant)
                if await store.stored_bytes(conn, tenant) + size > settings.tenant_max_stored_bytes:
                    raise OpenAIError(
                        413, "the tenant's file storage quota is used up", "storage_quota_exceeded", "file"
                    )
                obj = await store.insert_file(
                    conn,
                    file_id=file_id,
                    tenant_id=tenant,
                    purpose=purpose,
                    filename=filename,
                    size=size,
                    retention_s=settings.files_retention_s,
                )
        except BaseException:
            if committed:
                await asyncio.to_thread(files.remove, tenant, file_id)
            else:
                await asyncio.to_thread(files.discard, tmp, fh)
            raise
        return Response(obj)

    @get("/files")
    async def list_files(request: Request[Any, Any, Any]) -> Response[Any]:
        tenant = tenant_of(request)
        purpose, after = _query(request, "purpose"), _query(request, "after")
        limit = _limit(request, 10000, 10000)
        async with db.transaction() as conn:
            page = await store.list_files(conn, tenant, purpose=purpose, after=after, limit=limit)
        return Response(page)

    @get("/files/{file_id:str}")
    async def get_file(request: Request[Any, Any, Any], file_id: IdPath) -> Response[Any]:
        tenant = tenant_of(request)
        async with db.transaction() as conn:
            row = await store.get_file(conn, tenant, checked_id(file_id, "file"))
        if row is None:
            raise _not_found("file", file_id)
        return Response(store.file_object(row))

    @get("/files/{file_id:str}/content", media_type="application/octet-stream")
    async def file_content(request: Request[Any, Any, Any], file_id: IdPath) -> File:
        tenant = tenant_of(request)
        async with db.transaction() as conn:
            row = await store.get_file(conn, tenant, checked_id(file_id, "file"))
        if row is None:
            raise _not_found("file", file_id)
        return File(
            path=files.path(tenant, file_id),
            filename=row["filename"],
            media_type="application/octet-stream",
            chunk_size=256 * 1024,
        )

    @delete("/files/{file_id:str}", status_code=200)
    async def delete_file(request: Request[Any, Any, Any], file_id: IdPath) -> Response[Any]:
        tenant = tenant_of(request)
        async with db.transaction() as conn:
            deleted = await store.mark_file_deleted(conn, tenant, checked_id(file_id, "file"))
        if not deleted:
            raise _not_found("file", file_id)
        files.remove(tenant, file_id)
        return Response(FileDeleted(id=file_id))

    @post("/batches", status_code=200)
    async def create_batch(request: Request[Any, Any, Any]) -> Response[Any]:
        tenant = tenant_of(request)
        try:
            req = _decode_create(await request.body())
        except msgspec.ValidationError as exc:
            raise OpenAIError(400, f"invalid request: {exc}", "invalid_request") from None
        except msgspec.DecodeError:
            raise OpenAIError(400, "the body is not valid JSON", "invalid_json") from None
        if req.endpoint not in BATCH_ENDPOINTS:
            raise OpenAIError(
                400, f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}", "invalid_endpoint", "endpoint"
            )
        match = _WINDOW.match(req.completion_window)
        hours = int(match.group(1)) if match else 0
        if hours != 24 and not 24 < hours <= settings.batch_max_window_h:
            raise OpenAIError(
                400,
                f"completion_window must be '24h' (or up to '{settings.batch_max_window_h}h' on this site)",
                "invalid_completion_window",
                "completion_window",
            )
        if req.metadata is not None and len(req.metadata) > 16:
            raise OpenAIError(400, "metadata has at most 16 keys", "invalid_metadata", "metadata")
        async with db.transaction() as conn:
            # One tenant's creations are serialised, so the active-batch limit holds under races.
            await store.lock_tenant(conn, store.BATCH_CREATE_LOCK, tenant)
            row = await store.get_file(conn, tenant, checked_id(req.input_file_id, "file"))
            if row is None:
                raise _not_found("file", req.input_file_id)
            if row["purpose"] != "batch":
                raise OpenAIError(
                    400, "the input file's purpose must be 'batch'", "invalid_input_file", "input_file_id"
                )
            if await store.active_batches(conn, tenant) >= settings.tenant_max_active_batches:
                raise OpenAIError(
                    429,
                    f"at most {settings.tenant_max_active_batches} batches may run at once per tenant",
                    "batch_limit_exceeded",
                )
            obj = await store.insert_batch(
                conn,
                tenant_id=tenant,
                endpoint=req.endpoint,
                input_file_id=req.input_file_id,
                completion_window=req.completion_window,
                window_s=hours * 3600.0,
                metadata=req.metadata,
            )
        return Response(obj)

    @get("/batches")
    async def list_batches(request: Request[Any, Any, Any]) -> Response[Any]:
        tenant = tenant_of(request)
        after, limit = _query(request, "after"), _limit(request, 20, 100)
        async with db.transaction() as conn:
            page = await store.list_batches(conn, tenant, after=after, limit=limit)
        return Response(page)

    @get("/batches/{batch_id:str}")
    async def get_batch(request: Request[Any, Any, Any], batch_id: IdPath) -> Response[Any]:
        tenant = tenant_of(request)
        async with db.transaction() as conn:
            row = await store.get_batch(conn, tenant, checked_id(batch_id, "batch"))
        if row is None:
            raise _not_found("batch", batch_id)
        return Response(store.batch_object(row))

    @post("/batches/{batch_id:str}/cancel", status_code=200)
    async def cancel_batch(request: Request[Any, Any, Any], batch_id: IdPath) -> Response[Any]:
        tenant = tenant_of(request)
        async with db.transaction() as conn:
            row = await store.cancel_batch(conn, tenant, checked_id(batch_id, "batch"))
        if row is None:
            raise _not_found("batch", batch_id)
        return Response(store.batch_object(row))

    return Router(
        "/v1",
        route_handlers=[
            upload_file,
            list_files,
            get_file,
            file_content,
            delete_file,
            create_batch,
            list_batches,
            get_batch,
            cancel_batch,
        ],
        exception_handlers={OpenAIError: _openai_error, HTTPException: _http_error},
        include_in_schema=False,
    )


def _query(request: Request[Any, Any, Any], name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and len(value) > 256:
        raise OpenAIError(400, f"{name} is too long", "invalid_request", name)
    return value or None


def _limit(request: Request[Any, Any, Any], default: int, top: int) -> int:
    """The ``limit`` query parameter (read here: its errors must be OpenAI-shaped 400s)."""
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= top:
        raise OpenAIError(400, f"limit must be an integer from 1 to {top}", "invalid_request", "limit")
    return int(raw)


async def _receive_form(
    request: Request[Any, Any, Any], boundary: str, fh: Any, max_file: int, quota_left: int
) -> tuple[str | None, str | None, int]:
    """Stream the form: the ``file`` part's bytes into ``fh`` as they arrive; returns
    (filename, purpose, file size). 413 past the per-file limit or the tenant's storage quota."""
    filename: str | None = None
    purpose_parts: list[bytes] = []
    size = 0
    current: str | None = None
    piece: list[bytes] = []  # file bytes not written yet (copies: the parser reuses its buffer)
    piece_size = 0
    try:
        with PushMultipartParser(boundary, max_header_count=8, max_segment_count=8) as parser:
            async for chunk in request.stream():
                for event in parser.parse(chunk):
                    if event is None:
                        current = None
                    elif isinstance(event, bytes | bytearray | memoryview):
                        if current == "file":
                            size += len(event)
                            if size > max_file:
                                raise OpenAIError(
                                    413, f"the file is larger than {max_file} bytes", "file_too_large", "file"
                                )
                            if size > quota_left:
                                raise OpenAIError(
                                    413,
                                    "the tenant's file storage quota is used up",
                                    "storage_quota_exceeded",
                                    "file",
                                )
                            piece.append(bytes(event))
                            piece_size += len(event)
                            if piece_size >= _WRITE_PIECE:
                                await asyncio.to_thread(fh.write, b"".join(piece))
                                piece.clear()
                                piece_size = 0
                        elif current == "purpose":
                            purpose_parts.append(bytes(event))
                            if sum(map(len, purpose_parts)) > _MAX_FIELD:
                                raise OpenAIError(400, "purpose is too long", "invalid_purpose", "purpose")
                    else:
                        current = event.name
                        if current == "file":
                            if filename is not None:
                                raise OpenAIError(400, "send one file per upload", "invalid_file", "file")
                            filename = (event.filename or "upload.jsonl")[:255]
    except MultipartError as exc:
        raise OpenAIError(400, f"malformed multipart body: {exc}", "invalid_multipart") from None
    if piece:
        await asyncio.to_thread(fh.write, b"".join(piece))
    purpose = b"".join(purpose_parts).decode("utf-8", "replace").strip() if purpose_parts else None
    return filename, purpose, size
