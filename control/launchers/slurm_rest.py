"""Slurm through slurmrestd (its REST API), where a site runs it.

Talks HTTP/1.1 (one request per connection, bounded by a timeout and a size cap) to
``http(s)://host:port`` with a JWT (``X-SLURM-USER-NAME`` / ``X-SLURM-USER-TOKEN``), or to a
unix socket (``unix:///run/slurmrestd.sock``, local auth). Request and response mapping is in
:mod:`control.launchers.slurm_rest_map` (pure); this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

import msgspec

from control.launchers.base import JobSpec, LauncherError, ObservedJob
from control.launchers.slurm_parse import SlurmParseError
from control.launchers.slurm_rest_map import (
    cancel_ok,
    parse_jobs_response,
    parse_submit_response,
    submit_body,
)

_MAX_BODY = 64 << 20


class SlurmRestLauncher:
    kind = "slurmrest"

    def __init__(self, url: str, api_version: str = "v0.0.38", user: str | None = None,
                 token: str | None = None, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https", "unix"}:
            raise ValueError(f"slurmrest_url {url!r}: use http(s)://host:port or unix:///path")
        self._scheme = parts.scheme
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if parts.scheme == "https" else 6820)
        self._socket = parts.path if parts.scheme == "unix" else None
        self._base = f"/slurm/{api_version}"
        self._version = api_version
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if user:
            self._headers["X-SLURM-USER-NAME"] = user
        if token:
            self._headers["X-SLURM-USER-TOKEN"] = token
        self._timeout = timeout_s

    async def _request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._exchange(method, path, body), self._timeout)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            raise LauncherError(f"slurmrestd {method} {path}: {exc or type(exc).__name__}") from None

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self._socket is not None:
            reader, writer = await asyncio.open_unix_connection(self._socket)
        else:
            tls = ssl.create_default_context() if self._scheme == "https" else None
            reader, writer = await asyncio.open_connection(self._host, self._port, ssl=tls)
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {self._host}", "Connection: close",
                    f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in self._headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"bad status line {status_line[:100]!r}")
            length = None
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                data = bytearray()
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size + 2)
                    del data[-2:]
                    if len(data) > _MAX_BODY:
                        raise ValueError("response too large")
                payload = bytes(data)
            elif length is not None:
                if length > _MAX_BODY:
                    raise ValueError("response too large")
                payload = await reader.readexactly(length)
            else:
                payload = await reader.read(_MAX_BODY)
            return int(parts[1]), payload
        finally:
            writer.close()

    async def submit(self, spec: JobSpec) -> str:
        body = msgspec.json.encode(submit_body(spec, self._version))
        status, payload = await self._request("POST", f"{self._base}/job/submit", body)
        try:
            return parse_submit_response(status, payload)
        except SlurmParseError as exc:
            raise LauncherError(str(exc)) from None

    async def observe(self, name_prefix: str) -> list[ObservedJob]:
        status, payload = await self._request("GET", f"{self._base}/jobs")
        try:
            return parse_jobs_response(status, payload, name_prefix)
        except SlurmParseError as exc:
            raise LauncherError(str(exc)) from None

    async def cancel(self, launcher_job_id: str) -> None:
        if not launcher_job_id.isdigit():
            raise LauncherError(f"not a Slurm job id: {launcher_job_id!r}")
        status, payload = await self._request("DELETE", f"{self._base}/job/{launcher_job_id}")
        if not cancel_ok(status, payload):
            raise LauncherError(f"slurmrestd cancel {launcher_job_id}: HTTP {status}: {payload[:300]!r}")

    async def read_output(self, job: ObservedJob, max_bytes: int = 4096) -> str | None:
        # slurmrestd cannot read files; the output is readable only where the worker shares the
        # filesystem with the compute nodes (the usual case for job output directories).
        if not job.output_path:
            return None
        try:
            with open(job.output_path, "rb") as fh:  # noqa: ASYNC230 - a local tail read, tiny
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return None

    async def close(self) -> None:
        return None
