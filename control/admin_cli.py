"""``hpcgate admin``: the command-line client of the admin API.

Human-readable tables by default, ``--json`` for scripts (the API's JSON, unchanged). Every
admin operation of the API has a command; the mapping is in :func:`_build_parser`. Exit status:
0 on success, 1 when the API refused (the reason is printed), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from control.admin_client import AdminApiError, AdminClient, seg
from control.admin_render import render
from control.settings import DEFAULT_CONTROL_URL, AdminSettings
from control.wire import ApiKey, Endpoint, Job, KeyCreated, Model, Tenant, Usage
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
    if args.max_concurrent is not None:
        out["max_concurrent_requests"] = args.max_concurrent
    if args.tokens_per_minute is not None:
        out["tokens_per_minute"] = args.tokens_per_minute
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
    p.add_argument("--min", type=int, help="minimum instances")
    p.add_argument("--max", type=int, help="maximum instances")
    p.add_argument("--desired", type=int, help="desired instances")
    p.add_argument("--startup-timeout", type=int, metavar="SECONDS", help="time to become ready")
    p.add_argument("--max-model-len", type=int, help="context length")


def _add_tenant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-models", type=_csv, metavar="M1,M2", help="models this tenant may use")
    p.add_argument("--all-models", action="store_true", help="allow every model (the default)")
    p.add_argument("--max-concurrent", type=int, help="max concurrent requests")
    p.add_argument("--tokens-per-minute", type=int, help="token budget per minute")


def _set_enabled(enabled: bool) -> Command:
    def run(client: AdminClient, args: argparse.Namespace) -> tuple[bytes, Any]:
        return _do(client, Tenant, "PATCH", f"/admin/tenants/{seg(args.name)}", {"enabled": enabled})

    return run


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcgate admin", description="Client of the hpcgate admin API.")
    parser.add_argument("--url", help="control API URL (setting control_url, HPCGATE_CONTROL_URL)")
    parser.add_argument("--token", help="admin token (setting admin_token, HPCGATE_ADMIN_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")

    def cmd(sub: Any, name: str, fn: Command, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        return p

    t = groups.add_parser("tenant", help="tenants").add_subparsers(dest="action", required=True)
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
    p.add_argument("--disabled", action="store_true")
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

    k = groups.add_parser("key", help="API keys").add_subparsers(dest="action", required=True)
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
    p.add_argument("--description", default="")
    p.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--expires-in", type=int, metavar="SECONDS")
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
    p.add_argument("--tenant")
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
    when.add_argument("--at", metavar="ISO8601")
    when.add_argument("--never", action="store_true")

    m = groups.add_parser("model", help="model configurations").add_subparsers(dest="action", required=True)
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
    p.add_argument("desired", type=int)
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

    j = groups.add_parser("job", help="endpoint jobs").add_subparsers(dest="action", required=True)
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
    p.add_argument("--model")
    p.add_argument("--state")
    p.add_argument("--all", action="store_true", help="include ended and failed jobs")
    p.add_argument("--limit", type=int)
    cmd(
        j, "show", lambda c, a: _do(c, Job, "GET", f"/admin/jobs/{seg(a.job_id)}"), "show a job"
    ).add_argument("job_id", type=int)
    cmd(
        j, "cancel", lambda c, a: _do(c, Job, "POST", f"/admin/jobs/{seg(a.job_id)}/cancel"), "cancel a job"
    ).add_argument("job_id", type=int)
    cmd(
        j, "drain", lambda c, a: _do(c, Job, "POST", f"/admin/jobs/{seg(a.job_id)}/drain"), "drain a job"
    ).add_argument("job_id", type=int)

    e = groups.add_parser("endpoint", help="registered endpoints").add_subparsers(
        dest="action", required=True
    )
    cmd(
        e,
        "list",
        lambda c, a: _do(c, list[Endpoint], "GET", "/admin/endpoints", query={"model": a.model}),
        "list endpoints",
    ).add_argument("--model")
    cmd(
        e,
        "drain",
        lambda c, a: _do(c, Endpoint, "POST", f"/admin/endpoints/{seg(a.endpoint_id)}/drain"),
        "drain an endpoint",
    ).add_argument("endpoint_id", type=int)

    p = cmd(
        groups,
        "usage",
        lambda c, a: _do(
            c,
            Usage,
            "GET",
            "/admin/usage",
            query={"since": a.since, "until": a.until, "tenant": a.tenant, "model": a.model},
        ),
        "token usage per tenant and model",
    )
    p.add_argument("--since", metavar="ISO8601")
    p.add_argument("--until", metavar="ISO8601")
    p.add_argument("--tenant")
    p.add_argument("--model")
    return parser


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
        body = {k: v for k, v in body.items() if v is not None or k in ("expires_at", "allowed_models")}
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
    args = _build_parser().parse_args(argv)
    settings = load_settings(
        AdminSettings, "admin", overrides={"control_url": args.url, "admin_token": args.token}
    )
    url, token = connection(settings)
    client = AdminClient(url, token, settings.timeout_s)
    try:
        raw, value = args.fn(client, args)
    except AdminApiError as exc:
        where = f" (at {exc.body.path})" if exc.body.path else ""
        status = f"{exc.status} " if exc.status else ""
        print(f"hpcgate admin: error: {status}{exc.body.error}: {exc.body.message}{where}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(msgspec.json.format(raw, indent=2).decode() + "\n")
    else:
        print(render(value))
    return 0
