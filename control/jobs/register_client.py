"""``hpcgate control register``: the job side of registration (runs inside the job script).

Presents the job's endpoint-job id and one-time registration token to the control API
(``POST {control_url}/v1/register``) and prints what the job needs to start its server:

- ``--format port`` (default): the port alone;
- ``--format shell``: ``HPCG_PORT=…``, ``HPCG_ENDPOINT_ID=…``, ``HPCG_BEARER_TOKEN=…`` lines,
  shell-quoted, for ``eval`` in the template;
- ``--format json``: the API's answer plus the bearer token.

Settings (section ``job``): ``HPCGATE_JOB_ENDPOINT_JOB_ID``, ``HPCGATE_JOB_REGISTRATION_TOKEN``,
``HPCGATE_JOB_MODEL``, optionally ``HPCGATE_JOB_BEARER_TOKEN`` (the token the server will require;
generated when absent and printed in the shell/json formats), ``HPCGATE_JOB_CAPABILITIES``; plus
``HPCGATE_CONTROL_URL``. The launcher job id and node come from flags (the template passes
``$SLURM_JOB_ID`` and the node name), so nothing here reads the environment directly.

Exit status: 0 registered; 1 refused by the API (bad/expired/used token: not retried); 2 bad
settings or flags; 3 the API stayed unreachable or kept failing (5xx) through the bounded
retries. The reason is on stderr; the token is never printed or logged.
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import socket
import sys
import time
from typing import Annotated

import httpx
import msgspec

from control.http_client import tool_client
from hpcgate.backoff import Backoff
from hpcgate.settings import HttpUrl, LogLevel, PositiveFloat, load_settings

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
_BACKOFF_CAP_S = 8.0


class JobSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    control_url: HttpUrl = "http://127.0.0.1:8081"
    log_level: LogLevel = "info"
    endpoint_job_id: Annotated[int, msgspec.Meta(ge=1)] | None = None
    registration_token: Annotated[str, msgspec.Meta(min_length=16, max_length=512)] | None = None
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    bearer_token: Annotated[str, msgspec.Meta(min_length=16, max_length=512)] | None = None
    capabilities: tuple[str, ...] = ("chat", "completions")
    timeout_s: PositiveFloat = 10.0
    attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 6  # connection errors / 5xx only
    backoff_s: PositiveFloat = 0.5  # the first retry's ceiling; doubles per attempt (jittered), capped at 8 s


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_job_id: int
    registration_token: str
    launcher_job_id: str
    node: str
    model: str
    capabilities: tuple[str, ...]
    bearer_token: str


class Registered(msgspec.Struct, frozen=True):
    endpoint_id: int
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    model: str


class RegisterError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def register(settings: JobSettings, reg: Registration) -> Registered:
    """POST the claim, retrying connection errors and 5xx with capped backoff; raises RegisterError."""
    url = settings.control_url.rstrip("/") + "/v1/register"
    body = msgspec.json.encode(reg)
    backoff = Backoff(base_s=settings.backoff_s, cap_s=_BACKOFF_CAP_S)
    last = "no attempt made"
    with tool_client(settings.timeout_s) as client:
        for attempt in range(1, settings.attempts + 1):
            result, last = _attempt(client, url, body)
            if result is not None:
                return result
            if attempt < settings.attempts:
                delay = backoff.next_delay()
                print(f"hpcgate register: attempt {attempt} failed ({last}); retrying in {delay:.1f}s",
                      file=sys.stderr)
                time.sleep(delay)
    raise RegisterError(f"{last} (gave up after {settings.attempts} attempts)", EXIT_UNREACHABLE)


def _attempt(client: httpx.Client, url: str, body: bytes) -> tuple[Registered | None, str]:
    """One POST: the result, or None and why it may be retried; raises RegisterError if it may not."""
    try:
        response = client.post(url, content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        return None, f"cannot reach {url}: {exc or type(exc).__name__}"
    status, payload = response.status_code, response.content
    text = payload.decode("utf-8", "replace").strip()[:500]
    if status == 200:
        try:
            return msgspec.json.decode(payload, type=Registered), ""
        except msgspec.DecodeError as exc:
            raise RegisterError(f"registration API answered 200 with an unexpected body: {exc}",
                                EXIT_UNREACHABLE) from None
    if status < 500:
        raise RegisterError(f"registration refused: HTTP {status}: {text}", EXIT_REFUSED)
    return None, f"registration API failed: HTTP {status}: {text}"


def format_result(result: Registered, bearer_token: str, fmt: str) -> str:
    if fmt == "port":
        return f"{result.port}\n"
    if fmt == "shell":
        q = shlex.quote
        return (f"HPCG_PORT={result.port}\nHPCG_ENDPOINT_ID={result.endpoint_id}\n"
                f"HPCG_BEARER_TOKEN={q(bearer_token)}\n")
    doc = {"endpoint_id": result.endpoint_id, "port": result.port, "model": result.model,
           "bearer_token": bearer_token}
    return msgspec.json.encode(doc).decode() + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcgate control register",
                                description="The job side of registration (runs inside the job script).")
    p.add_argument("--launcher-job-id", required=True, help='the scheduler\'s job id (e.g. "$SLURM_JOB_ID")')
    p.add_argument("--node", default=None, help="node name the gateways reach (default: hostname)")
    p.add_argument("--format", choices=("port", "shell", "json"), default="port",
                   help="print the port only (default), shell assignments, or JSON")
    p.add_argument("--control-url", default=None, help="control API URL (default $HPCGATE_JOB_CONTROL_URL)")
    p.add_argument("--endpoint-job-id", type=int, default=None,
                   help="the endpoint job's id (default $HPCGATE_JOB_ENDPOINT_JOB_ID)")
    p.add_argument("--model", default=None, help="the model this job serves (default $HPCGATE_JOB_MODEL)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(JobSettings, "job", overrides={
        "control_url": args.control_url, "endpoint_job_id": args.endpoint_job_id, "model": args.model})
    missing = [env for env, value in (("HPCGATE_JOB_ENDPOINT_JOB_ID", settings.endpoint_job_id),
                                      ("HPCGATE_JOB_REGISTRATION_TOKEN", settings.registration_token),
                                      ("HPCGATE_JOB_MODEL", settings.model)) if value is None]
    launcher_job_id = args.launcher_job_id.strip()
    if not launcher_job_id:
        missing.append("--launcher-job-id (empty: is $SLURM_JOB_ID set?)")
    if missing:
        print(f"hpcgate register: missing {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    assert settings.endpoint_job_id is not None and settings.registration_token is not None
    assert settings.model is not None
    bearer = settings.bearer_token or secrets.token_urlsafe(32)
    reg = Registration(
        endpoint_job_id=settings.endpoint_job_id,
        registration_token=settings.registration_token,
        launcher_job_id=launcher_job_id,
        node=args.node or socket.gethostname(),
        model=settings.model,
        capabilities=settings.capabilities,
        bearer_token=bearer,
    )
    try:
        result = register(settings, reg)
    except RegisterError as exc:
        print(f"hpcgate register: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(format_result(result, bearer, args.format))
    sys.stdout.flush()
    return 0
