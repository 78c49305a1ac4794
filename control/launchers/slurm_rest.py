"""Slurm through slurmrestd (its REST API), where a site runs it.

Talks HTTP to ``http(s)://host:port`` with a JWT (``X-SLURM-USER-NAME`` / ``X-SLURM-USER-TOKEN``),
or to a unix socket (``unix:///run/slurmrestd.sock``, local auth), through one httpx client per
launcher (connect/read timeouts, a size cap on every answer). Request and response mapping is in
:mod:`control.launchers.slurm_rest_map` (pure); this module only moves bytes.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import msgspec

from control.http_client import BodyTooLargeError, daemon_client, read_capped
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
        if parts.scheme == "unix":
            transport: httpx.AsyncBaseTransport | None = httpx.AsyncHTTPTransport(uds=parts.path)
            base_url = "http://localhost"
        else:
            transport = None
            host = parts.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            base_url = f"{parts.scheme}://{host}:{parts.port or (443 if parts.scheme == 'https' else 6820)}"
        self._base = f"/slurm/{api_version}"
        self._version = api_version
        headers = {"content-type": "application/json", "accept": "application/json"}
        if user:
            headers["x-slurm-user-name"] = user
        if token:
            headers["x-slurm-user-token"] = token
        self._client = daemon_client(timeout_s, max_connections=8, transport=transport, base_url=base_url)
        self._client.headers.update(headers)

    async def _request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        try:
            async with self._client.stream(method, path, content=body or None) as response:
                return response.status_code, await read_capped(response, _MAX_BODY)
        except (httpx.HTTPError, BodyTooLargeError) as exc:
            raise LauncherError(f"slurmrestd {method} {path}: {exc or type(exc).__name__}") from None

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
        await self._client.aclose()
