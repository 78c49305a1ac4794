"""Typed settings for every hpcgate process, from ``HPCGATE_*`` variables and a TOML file.

Each process defines one frozen ``msgspec.Struct`` of settings and loads it once at start with
:func:`load_settings`; the object is then passed down explicitly. Nothing else in the code base
reads ``os.environ`` for configuration.

Naming: a field ``port`` of the section ``gateway`` is ``HPCGATE_GATEWAY_PORT`` in the
environment and ``port`` under ``[gateway]`` in the TOML file. Fields listed in
:data:`COMMON_FIELDS` (database and Redis addresses, the key-hash secret, ...) are shared by
all processes and have no section: ``HPCGATE_DATABASE_URL``, top-level ``database_url``.

Invariants: an unknown name (an ``HPCGATE_*`` variable or TOML key that no process defines) or
a malformed value raises :class:`SettingsError` whose message names the variable or key;
environment variables override the file; list fields accept ``a,b,c`` or a JSON array.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

ENV_PREFIX = "HPCGATE_"
CONFIG_ENV = "HPCGATE_CONFIG"

# Sections that own settings; a variable HPCGATE_<SECTION>_* belongs to that section.
SECTIONS = (
    "gateway", "control", "db", "job", "api", "jobs", "health", "autoscaler", "sim", "bench", "up", "admin",
    "batches",
)

# Settings every process may read; they carry no section prefix.
COMMON_FIELDS = frozenset(
    {
        "database_url",
        "redis_url",
        "redis_prefix",
        "key_hash_secret",
        "log_level",
        "data_dir",
        "admin_token",
        "control_url",
        "internal_token",  # the gateway's proof to the control API and the runner's to the gateway
        "batch_dir",  # the batch file store (a directory; on a cluster, on the shared filesystem)
    }
)

T = TypeVar("T", bound=msgspec.Struct)

# Constrained types for settings structs, so a malformed value fails at start.
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PostgresUrl = Annotated[str, msgspec.Meta(pattern=r"^postgres(ql)?://")]
RedisUrl = Annotated[str, msgspec.Meta(pattern=r"^(redis|rediss|unix)://")]
HttpUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^/\s]+")]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
LogLevel = Literal["debug", "info", "warning", "error"]

_PATH_RE = re.compile(r"\s*-\s*at `\$\.([A-Za-z0-9_]+)[^`]*`")


class SettingsError(Exception):
    """A setting is unknown or malformed; the message names it and says why."""


def _list_like(tp: msgspec.inspect.Type) -> bool:
    if isinstance(tp, msgspec.inspect.UnionType):
        return any(_list_like(t) for t in tp.types)
    return isinstance(tp, (msgspec.inspect.ListType, msgspec.inspect.TupleType,
                           msgspec.inspect.VarTupleType, msgspec.inspect.FrozenSetType,
                           msgspec.inspect.SetType))


def _split_list(value: str) -> Any:
    text = value.strip()
    if text.startswith("["):
        return msgspec.json.decode(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def _env_name(section: str, field: str) -> str:
    if field in COMMON_FIELDS:
        return f"{ENV_PREFIX}{field.upper()}"
    return f"{ENV_PREFIX}{section.upper()}_{field.upper()}"


def _check_env_names(env: Mapping[str, str]) -> None:
    """Reject HPCGATE_* variables that no section or common field can own (typos)."""
    sections = tuple(f"{s.upper()}_" for s in SECTIONS)
    for name in env:
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest = name[len(ENV_PREFIX):]
        if rest.lower() in COMMON_FIELDS or rest.startswith(sections):
            continue
        raise SettingsError(f"unknown setting {name}: not a known hpcgate setting")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"{CONFIG_ENV}: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{CONFIG_ENV}: {path} is not valid TOML: {exc}") from None


def load_settings(
    cls: type[T],
    section: str,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
) -> T:
    """Build ``cls`` for ``section`` from the TOML file, then env, then ``overrides`` (CLI flags).

    Raises SettingsError naming the offending variable or key.
    """
    if section not in SECTIONS:
        raise ValueError(f"unknown settings section {section!r}")
    env = os.environ if env is None else env
    _check_env_names(env)
    fields = {f.name: f for f in msgspec.inspect.type_info(cls).fields}  # type: ignore[attr-defined]
    raw: dict[str, Any] = {}
    source: dict[str, str] = {}

    path = config_path or env.get(CONFIG_ENV)
    if path:
        data = _read_toml(Path(path))
        for key, value in data.items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise SettingsError(f"{path}: [{key}] must be a table")
                if key != section:
                    continue
                for sub, subval in value.items():
                    if sub not in fields or sub in COMMON_FIELDS:
                        raise SettingsError(f"{path}: unknown setting [{key}] {sub}")
                    raw[sub], source[sub] = subval, f"{path}: [{key}] {sub}"
            elif key in COMMON_FIELDS:
                if key in fields:
                    raw[key], source[key] = value, f"{path}: {key}"
            else:
                raise SettingsError(f"{path}: unknown setting {key}")

    own_prefix = f"{ENV_PREFIX}{section.upper()}_"
    for name, value in env.items():
        # Common names first: HPCGATE_ADMIN_TOKEN is the common admin_token, not [admin] token.
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].lower() in COMMON_FIELDS:
            field = name[len(ENV_PREFIX):].lower()
            if field not in fields:
                continue
        elif name.startswith(own_prefix):
            field = name[len(own_prefix):].lower()
            if field not in fields or field in COMMON_FIELDS:
                raise SettingsError(f"unknown setting {name}: {section} has no setting {field!r}")
        elif name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].lower() in fields:
            field = name[len(ENV_PREFIX):].lower()
            if field not in COMMON_FIELDS:
                continue
        else:
            continue
        raw[field] = _split_list(value) if _list_like(fields[field].type) else value
        source[field] = name

    for field, value in (overrides or {}).items():
        if value is not None:
            raw[field], source[field] = value, f"--{field.replace('_', '-')}"

    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        match = _PATH_RE.search(msg)
        field = match.group(1) if match else ""
        where = source.get(field) or (_env_name(section, field) if field else section)
        reason = _PATH_RE.sub("", msg)
        raise SettingsError(f"invalid setting {where}: {reason}") from None
    except msgspec.DecodeError as exc:
        raise SettingsError(f"invalid setting in section {section}: {exc}") from None
