"""``hpcgate admin``: the command-line client of the admin API.

Human-readable tables by default, ``--json`` for scripts (the API's JSON, unchanged). Every
admin operation of the API has a command; the mapping is in :func:`build_parser`. Exit status:
0 on success, 1 when the API refused (the reason is printed), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from control.admin_client import AdminApiError, AdminClient, seg
from control.admin_render import render
from control.settings import DEFAULT_CONTROL_URL, AdminSettings
from control.ui_tickets import LOGIN, LOGIN_TTL_S, SESSION_TTL_S, sign
from control.wire import ApiKey, Endpoint, Job, KeyCreated, Model, Tenant, Tribunal, Usage
from hpcgate.settings import SettingsError, load_settings

T = TypeVar("T")
Command = Callable[[AdminClient, argparse.Namespace], tuple[bytes, Any]]

# ----------------------------------------------------------------------------- argument parsing


def _resource(text: str) -> tuple[str, str | int | float | bool]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: str | int | float | bool = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                continue
    return key, value


def _limit(text: str) -> int | None:
    """A tenant limit: a positive integer, or ``none`` to remove the limit."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, or none for no limit; got {text!r}")
    return value


def _time(text: str) -> str:
    """An RFC 3339 time, or a date (``2026-11-29``), which means 00:00 UTC of that day."""
    try:
        return date.fromisoformat(text).isoformat() + "T00:00:00Z" if len(text) == 10 else text
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date (2026-11-29) or a time "
                                         f"(2026-11-29T08:00:00Z), got {text!r}") from None


_MODEL_LIMIT_KEYS = {"concurrent": "max_concurrent_requests", "tpm": "tokens_per_minute"}
_MODEL_LIMIT_HELP = "expected MODEL=concurrent=N,tpm=N (either or both), got %r"


def _model_limit(text: str) -> tuple[str, dict[str, int]]:
    """``MODEL=concurrent=N,tpm=N`` (either or both) -> (model, limits)."""
    model, sep, rest = text.partition("=")
    limits: dict[str, int] = {}
    for item in rest.split(","):
        key, eq, raw = item.partition("=")
        field = _MODEL_LIMIT_KEYS.get(key.strip())
        value = _limit(raw) if eq and field else None
        if field is None or value is None:
            raise argparse.ArgumentTypeError(_MODEL_LIMIT_HELP % text)
        limits[field] = value
    if not sep or not model:
        raise argparse.ArgumentTypeError(_MODEL_LIMIT_HELP % text)
    return model, limits


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _model_fields(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.no_aliases:
        out["aliases"] = []
    elif args.alias is not None:
        out["aliases"] = args.alias
    for attr, field in (
        ("engine_arg", "engine_args"),
        ("template", "slurm_template"),
        ("min", "min_instances"),
        ("max", "max_instances"),
        ("desired", "desired_instances"),
        ("startup_timeout", "startup_timeout_s"),
        ("max_model_len", "max_model_len"),
    ):
        if getattr(args, attr) is not None:
            out[field] = getattr(args, attr)
    if args.resource is not None:
        out["slurm_resources"] = dict(args.resource)
    return out


def _tenant_fields(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.all_models:
        out["allowed_models"] = None
    elif args.allowed_models is not None:
        out["allowed_models"] = args.allowed_models
    for attr, field in (("max_concurrent", "max_concurrent_requests"),
                        ("tokens_per_minute", "tokens_per_minute"), ("monthly_quota", "monthly_token_quota")):
        if hasattr(args, attr):  # absent unless given (SUPPRESS); None clears the limit
            out[field] = getattr(args, attr)
    if args.no_model_limits:
        out["model_limits"] = {}
    elif args.model_limit is not None:
        out["model_limits"] = dict(args.model_limit)
    return out


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias", action="append", help="another name clients may use (repeatable; replaces)")
    p.add_argument("--no-aliases", action="store_true", help="remove all aliases")
    p.add_argument(
        "--engine-arg", action="append", help="vLLM argument (repeatable; write --engine-arg=--flag=value)"
    )
    p.add_argument("--template", help="Slurm job template name (default sim)")
    p.add_argument(
        "--resource",
        action="append",
        type=_resource,
        metavar="KEY=VALUE",
        help="a slurm_resources field, e.g. gpus_per_node=1, partition=gpu, time=12:00:00, "
        "image=/path/vllm.sif (repeatable; replaces the set; fields: docs/operations.md)",
    )
    p.add_argument("--min", type=int, help="minimum instances (create: default 0)")
    p.add_argument("--max", type=int, help="maximum instances (create: default 1; scale never goes above it)")
    p.add_argument("--desired", type=int, help="desired instances (create: default 0)")
    p.add_argument("--startup-timeout", type=int, metavar="SECONDS", help="time to become ready")
    p.add_argument("--max-model-len", type=int, help="context length (default: the engine's)")


def _add_tenant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-models", type=_csv, metavar="M1,M2", help="models this tenant may use")
    p.add_argument("--all-models", action="store_true", help="allow every model (the default)")
    for flag, what in (("--max-concurrent", "concurrent requests"),
                       ("--tokens-per-minute", "tokens per minute")):
        p.add_argument(flag, type=_limit, default=argparse.SUPPRESS, metavar="N|none",
                       help=f"at most N {what}; none removes the limit (default: no limit)")
    p.add_argument("--monthly-quota", type=_limit, default=argparse.SUPPRESS, metavar="N|none",
                   help="at most N prompt + completion tokens per calendar month (UTC); none removes it")
    p.add_argument("--model-limit", action="append", type=_model_limit, metavar="MODEL=concurrent=N,tpm=N",
                   help="limits on one model, on top of the tenant's (repeatable; replaces the set)")
    p.add_argument("--no-model-limits", action="store_true", help="remove every per-model limit")


def _set_enabled(enabled: bool) -> Command:
    def run(client: AdminClient, args: argparse.Namespace) -> tuple[bytes, Any]:
        return _do(client, Tenant, "PATCH", f"/admin/tenants/{seg(args.name)}", {"enabled": enabled})

    return run


def _juror(text: str) -> dict[str, Any]:
    """``MODEL`` or ``MODEL@TEMPERATURE`` (a model name may contain ``@`` only before a number)."""
    model, sep, temp = text.rpartition("@")
    if sep and model:
        try:
            return {"model": model, "temperature": float(temp)}
        except ValueError:
            pass
    return {"model": text}


def _tribunal_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The body of a tribunal create/update: ``--config`` (a JSON file) overlaid with the flags given."""
    out: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = msgspec.json.decode(Path(args.config).read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            raise SystemExit(f"hpcgate admin: error: --config {args.config}: {exc}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"hpcgate admin: error: --config {args.config}: expected a JSON object")
        out.update(loaded)
    if args.juror:
        out["jurors"] = [_juror(j) for j in args.juror]
    for field in ("judge", "fallback_judge", "rounds", "quorum", "juror_timeout_s", "judge_timeout_s",
                  "deadline_s", "grace_s", "judge_prompt", "critique_prompt", "revise_prompt",
                  "review_prompt", "peer_review", "show_deliberation"):
        value = getattr(args, field)
        if value is not None:
            out[field] = value
    return out


def _add_tribunal_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a JSON file with any fields of the tribunal (the flags "
                   "override it): per-juror system prompts go there")
    p.add_argument("--juror", action="append", metavar="MODEL[@TEMP]",
                   help="a juror (repeat; the same model may appear with different temperatures)")
    p.add_argument("--judge", metavar="MODEL", help="the model that writes the final answer")
    p.add_argument("--fallback-judge", metavar="MODEL", help="asked when the judge fails")
    p.add_argument("--rounds", type=int, help="critique-and-revise rounds (default 0)")
    p.add_argument("--quorum", type=int, help="jurors that must answer (default 1)")
    p.add_argument("--juror-timeout-s", type=float, metavar="S", help="per juror step (default 60)")
    p.add_argument("--judge-timeout-s", type=float, metavar="S", help="per judge step (default 120)")
    p.add_argument("--deadline-s", type=float, metavar="S", help="the whole request (default 300)")
    p.add_argument("--grace-s", type=float, metavar="S", help="stragglers' time once the quorum answered "
                   "(default 2)")
    for role in ("judge", "critique", "revise", "review"):
        p.add_argument(f"--{role}-prompt", metavar="TEXT", help=f"the {role} prompt (placeholders: "
                       "docs/tribunal.md)")
    p.add_argument("--peer-review", action=argparse.BooleanOptionalAction, default=None,
                   help="jurors revise against each other's anonymised answers before the judge")
    p.add_argument("--show-deliberation", action=argparse.BooleanOptionalAction, default=None,
                   help="always stream/return the deliberation (else only when a request asks)")


def _delete(cls: type[Tenant | Model | Tribunal], collection: str) -> Command:
    def run(client: AdminClient, args: argparse.Namespace) -> tuple[bytes, Any]:
        return _do(client, cls, "DELETE", f"/admin/{collection}/{seg(args.name)}")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcgate admin", description="Client of the hpcgate admin API.")
    parser.add_argument("--url", help="control API URL (setting control_url, HPCGATE_CONTROL_URL)")
    parser.add_argument("--token", help="admin token (setting admin_token, HPCGATE_ADMIN_TOKEN)")
    parser.add_argument("--json", action="store_true", help=_JSON_HELP)
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")

    def cmd(sub: Any, name: str, fn: Command, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        _json_flag(p)
        return p

    def group(name: str, help_: str) -> Any:
        g: argparse.ArgumentParser = groups.add_parser(name, help=help_, description=help_)
        _json_flag(g)
        return g.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = group("tenant", "tenants")
    p = cmd(
        t,
        "create",
        lambda c, a: _do(
            c,
            Tenant,
            "POST",
            "/admin/tenants",
            {"name": a.name, "enabled": not a.disabled, **_tenant_fields(a)},
        ),
        "create a tenant",
    )
    p.add_argument("name")
    p.add_argument("--disabled", action="store_true", help="create it disabled (its keys do not work)")
    _add_tenant_flags(p)
    cmd(t, "list", lambda c, a: _do(c, list[Tenant], "GET", "/admin/tenants"), "list tenants")
    cmd(
        t, "show", lambda c, a: _do(c, Tenant, "GET", f"/admin/tenants/{seg(a.name)}"), "show a tenant"
    ).add_argument("name")
    p = cmd(
        t,
        "update",
        lambda c, a: _do(c, Tenant, "PATCH", f"/admin/tenants/{seg(a.name)}", _tenant_fields(a)),
        "change a tenant's limits",
    )
    p.add_argument("name")
    _add_tenant_flags(p)
    for action, enabled in (("disable", False), ("enable", True)):
        cmd(
            t,
            action,
            _set_enabled(enabled),
            f"{action} a tenant (and its keys)",
        ).add_argument("name")
    cmd(
        t, "delete", _delete(Tenant, "tenants"),
        "delete a tenant without active keys (its old keys and usage records go with it)",
    ).add_argument("name")

    k = group("key", "API keys")
    p = cmd(
        k,
        "create",
        lambda c, a: _do(
            c,
            KeyCreated,
            "POST",
            f"/admin/tenants/{seg(a.tenant)}/keys",
            {"description": a.description, "expires_at": a.expires_at, "expires_in_s": a.expires_in},
        ),
        "create a key (shown once)",
    )
    p.add_argument("tenant")
    p.add_argument("--description", default="", help="a note for operators (who uses the key, what for)")
    p.add_argument("--expires-at", type=_time, metavar="TIME", help=f"expiry: {_TIME_HELP}")
    p.add_argument("--expires-in", type=int, metavar="SECONDS", help="expiry, in seconds from now")
    p = cmd(
        k,
        "list",
        lambda c, a: _do(
            c,
            list[ApiKey],
            "GET",
            "/admin/keys",
            query={"prefix": a.prefix, "tenant": a.tenant, "all": a.all or None},
        ),
        "list keys",
    )
    p.add_argument("--prefix", help="the key's first characters, e.g. hpg_AbCd")
    p.add_argument("--tenant", help="only this tenant's keys")
    p.add_argument("--all", action="store_true", help="include revoked and expired keys")
    cmd(
        k,
        "revoke",
        lambda c, a: _do(c, ApiKey, "POST", f"/admin/keys/{seg(a.key_id)}/revoke"),
        "revoke a key",
    ).add_argument("key_id", type=int)
    p = cmd(
        k,
        "expire",
        lambda c, a: _do(
            c, ApiKey, "PATCH", f"/admin/keys/{seg(a.key_id)}", {"expires_at": None if a.never else a.at}
        ),
        "set or clear a key's expiry",
    )
    p.add_argument("key_id", type=int)
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", type=_time, metavar="TIME", help=f"the new expiry: {_TIME_HELP}")
    when.add_argument("--never", action="store_true", help="the key never expires")

    m = group("model", "model configurations")
    p = cmd(
        m,
        "create",
        lambda c, a: _do(c, Model, "POST", "/admin/models", {"name": a.name, **_model_fields(a)}),
        "create a model",
    )
    p.add_argument("name")
    _add_model_flags(p)
    p = cmd(
        m,
        "update",
        lambda c, a: _do(c, Model, "PATCH", f"/admin/models/{seg(a.name)}", _model_fields(a)),
        "change a model",
    )
    p.add_argument("name")
    _add_model_flags(p)
    p = cmd(
        m,
        "scale",
        lambda c, a: _do(c, Model, "PATCH", f"/admin/models/{seg(a.name)}", {"desired_instances": a.desired}),
        "set desired instances",
    )
    p.add_argument("name")
    p.add_argument("desired", type=int, help="between the model's min and max instances")
    cmd(m, "list", lambda c, a: _do(c, list[Model], "GET", "/admin/models"), "list models")
    cmd(
        m, "show", lambda c, a: _do(c, Model, "GET", f"/admin/models/{seg(a.name)}"), "show a model"
    ).add_argument("name")
    cmd(
        m,
        "drain",
        lambda c, a: _do(c, Model, "POST", f"/admin/models/{seg(a.name)}/drain"),
        "drain a model (stop routing, stop its jobs)",
    ).add_argument("name")
    cmd(
        m,
        "activate",
        lambda c, a: _do(c, Model, "PATCH", f"/admin/models/{seg(a.name)}", {"state": "active"}),
        "undo a drain, clear a failure",
    ).add_argument("name")
    cmd(
        m, "delete", _delete(Model, "models"),
        "delete a model without live jobs (scale it to 0 first; its aliases and ended jobs go with it)",
    ).add_argument("name")

    tr = group("tribunal", "tribunals: virtual models tribunal/NAME (docs/tribunal.md)")
    p = cmd(
        tr,
        "create",
        lambda c, a: _do(c, Tribunal, "POST", "/admin/tribunals", {**_tribunal_fields(a), "name": a.name}),
        "create a tribunal",
    )
    p.add_argument("name")
    _add_tribunal_flags(p)
    p = cmd(
        tr,
        "update",
        lambda c, a: _do(c, Tribunal, "PATCH", f"/admin/tribunals/{seg(a.name)}", _tribunal_fields(a)),
        "change a tribunal (the fields given)",
    )
    p.add_argument("name")
    _add_tribunal_flags(p)
    cmd(tr, "list", lambda c, a: _do(c, list[Tribunal], "GET", "/admin/tribunals"), "list tribunals")
    cmd(
        tr, "show", lambda c, a: _do(c, Tribunal, "GET", f"/admin/tribunals/{seg(a.name)}"), "show a tribunal"
    ).add_argument("name")
    cmd(tr, "delete", _delete(Tribunal, "tribunals"), "delete a tribunal").add_argument("name")

    j = group("job", "endpoint jobs")
    p = cmd(
        j,
        "list",
        lambda c, a: _do(
            c,
            list[Job],
            "GET",
            "/admin/jobs",
            query={"model": a.model, "state": a.state, "all": a.all or None, "limit": a.limit},
        ),
        "list jobs",
    )
    p.add_argument("--model", help="only this model's jobs")
    p.add_argument("--state", help="only jobs in this state (e.g. running, pending, draining)")
    p.add_argument("--all", action="store_true", help="include ended and failed jobs")
    p.add_argument("--limit", type=int, help="at most this many, newest first (default 200)")
    cmd(
        j, "show", lambda c, a: _do(c, Job, "GET", f"/admin/jobs/{seg(a.job_id)}"), "show a job"
    ).add_argument("job_id", type=int)
    cmd(
        j, "cancel", lambda c, a: _do(c, Job, "POST", f"/admin/jobs/{seg(a.job_id)}/cancel"), "cancel a job"
    ).add_argument("job_id", type=int)
    cmd(
        j, "drain", lambda c, a: _do(c, Job, "POST", f"/admin/jobs/{seg(a.job_id)}/drain"), "drain a job"
    ).add_argument("job_id", type=int)

    e = group("endpoint", "registered endpoints")
    cmd(
        e,
        "list",
        lambda c, a: _do(c, list[Endpoint], "GET", "/admin/endpoints", query={"model": a.model}),
        "list endpoints",
    ).add_argument("--model", help="only this model's endpoints")
    cmd(
        e,
        "drain",
        lambda c, a: _do(c, Endpoint, "POST", f"/admin/endpoints/{seg(a.endpoint_id)}/drain"),
        "drain an endpoint",
    ).add_argument("endpoint_id", type=int)

    p = cmd(
        groups,
        "usage",
        _usage,
        "token usage per tenant and model (and period), with monthly quotas left; table, CSV or JSON",
    )
    p.add_argument("--since", type=_time, metavar="TIME",
                   help=f"start (default: 24 h before --until); {_TIME_HELP}")
    p.add_argument("--until", type=_time, metavar="TIME", help=f"end, excluded (default: now); {_TIME_HELP}")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--model", help="only this model")
    p.add_argument("--period", choices=("total", "hour", "day", "month"), default="total",
                   help="one row per tenant and model (total), or per UTC hour, day or month as well")
    p.add_argument("--csv", action="store_true", help="print CSV (the API's /admin/usage.csv) for accounting")

    groups.add_parser("ui", help=_UI_HELP, description=_UI_HELP)
    return parser


_UI_HELP = ("print a login link to the operator page (a read-only overview in the browser); "
            f"the link works for {LOGIN_TTL_S // 60} minutes, the session it opens for "
            f"{SESSION_TTL_S // 3600} hours")


def ui_login_url(control_url: str, token: str, now: float) -> str:
    """The operator page's login link: a ticket signed with the admin token, not the token."""
    ticket = sign(token, LOGIN, now, LOGIN_TTL_S)
    return f"{control_url.rstrip('/')}/ui/login?ticket={ticket}"


class CsvText(str):
    """A CSV answer: printed as it is."""


def _usage(client: AdminClient, a: argparse.Namespace) -> tuple[bytes, Any]:
    query = {"since": a.since, "until": a.until, "tenant": a.tenant, "model": a.model, "period": a.period}
    if a.csv:
        raw = client.raw("GET", "/admin/usage.csv", None, query)
        return raw, CsvText(raw.decode())
    return _do(client, Usage, "GET", "/admin/usage", query=query)


_JSON_HELP = "print the API's JSON (accepted anywhere on the command line)"
_TIME_HELP = "2026-11-29T08:00:00Z, or a date (2026-11-29: 00:00 UTC)"


def _json_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a --json given earlier on the line is not reset by this parser's default
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=_JSON_HELP)


# Body fields where null means something (no expiry, every model, no limit): sent when given.
_NULLABLE = ("expires_at", "allowed_models", "max_concurrent_requests", "tokens_per_minute",
             "monthly_token_quota")


def _do(
    client: AdminClient,
    cls: Any,
    method: str,
    path: str,
    body: object = None,
    *,
    query: dict[str, Any] | None = None,
) -> tuple[bytes, Any]:
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None or k in _NULLABLE}
        if method == "POST" and path.endswith("/keys"):
            body = {k: v for k, v in body.items() if v is not None}
    raw = client.raw(method, path, body, query)
    return raw, msgspec.json.decode(raw, type=cls)


class _UpStack(msgspec.Struct):
    control_url: str


class _UpSecrets(msgspec.Struct):
    admin_token: str


def _read_json(path: Path, cls: type[T]) -> T | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=cls)
    except (OSError, msgspec.DecodeError):
        return None


def connection(settings: AdminSettings) -> tuple[str, str]:
    """The control URL and admin token: the settings' own, else those of the stack `hpcgate up`
    runs in ``data_dir`` (so the CLI works right after ``up`` with nothing exported)."""
    data_dir = Path(settings.data_dir)
    url, token = settings.control_url, settings.admin_token
    if url is None:
        stack = _read_json(data_dir / "stack.json", _UpStack)
        url = stack.control_url if stack else DEFAULT_CONTROL_URL
    if not token:
        found = _read_json(data_dir / "secrets.json", _UpSecrets)
        if found is None:
            raise SettingsError(
                "missing setting HPCGATE_ADMIN_TOKEN (or --token): no hpcgate up stack in "
                f"{data_dir.resolve()} either (run from the directory of `hpcgate up`, set "
                "HPCGATE_DATA_DIR to its --data-dir, or source its env.sh)")
        token = found.admin_token
    return url, token


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and getattr(args, "csv", False):
        parser.error("--csv and --json exclude each other")
    settings = load_settings(
        AdminSettings, "admin", overrides={"control_url": args.url, "admin_token": args.token}
    )
    url, token = connection(settings)
    if args.group == "ui":
        print(ui_login_url(url, token, time.time()))
        return 0
    client = AdminClient(url, token, settings.timeout_s)
    try:
        raw, value = args.fn(client, args)
    except AdminApiError as exc:
        where = f" (at {exc.body.path})" if exc.body.path else ""
        status = f"{exc.status} " if exc.status else ""
        print(f"hpcgate admin: error: {status}{exc.body.error}: {exc.body.message}{where}", file=sys.stderr)
        return 1
    if isinstance(value, CsvText):
        sys.stdout.write(value)
    elif args.json:
        sys.stdout.write(msgspec.json.format(raw, indent=2).decode() + "\n")
    else:
        print(render(value))
    return 0
