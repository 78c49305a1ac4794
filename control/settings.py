"""Typed settings of the control-plane processes: ``control api``, ``control health``, ``admin``.

One frozen struct per process, loaded once at start by :func:`hpcgate.settings.load_settings`
and passed down. Common fields (database, Redis, key-hash secret, admin token, control URL)
carry no section prefix (``HPCGATE_DATABASE_URL``); the others are ``HPCGATE_API_*``,
``HPCGATE_HEALTH_*`` and ``HPCGATE_ADMIN_*``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from hpcgate.settings import HttpUrl, LogLevel, Port, PositiveFloat, PostgresUrl, RedisUrl, SettingsError

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/hpcgate"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_CONTROL_URL = "http://127.0.0.1:8081"

PortNumber = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class ApiSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``hpcgate control api``: registration API, admin API, Prometheus HTTP SD."""

    database_url: PostgresUrl = DEFAULT_DATABASE_URL
    key_hash_secret: str = ""  # HMAC secret of API keys; must equal the gateway's
    admin_token: str = ""  # Bearer token of the admin API; required
    log_level: LogLevel = "info"
    host: str = "127.0.0.1"
    port: Port = 8081
    port_range_start: PortNumber = 20000  # ports handed to registering jobs, per node
    port_range_end: PortNumber = 20999
    db_pool_size: PositiveInt = 8
    db_timeout_s: PositiveFloat = 5.0  # per query; an outage answers 503 after this
    max_body_bytes: PositiveInt = 1 << 20
    sd_token: str = ""  # if set, /sd/* require "Authorization: Bearer <sd_token>"
    shutdown_timeout_s: PositiveFloat = 10.0  # SIGTERM: requests in progress may finish this long
    # Site template directories, as the Job Worker's jobs.template_dirs: a model's template is
    # checked against them (and the built-in ones) when it is created or changed.
    template_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.port_range_end < self.port_range_start:
            raise ValueError("port_range_end must be >= port_range_start")


class HealthSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``hpcgate control health``: the Endpoint Worker."""

    database_url: PostgresUrl = DEFAULT_DATABASE_URL
    redis_url: RedisUrl = DEFAULT_REDIS_URL
    redis_prefix: str = "hpcgate:"
    log_level: LogLevel = "info"
    probe_interval_s: PositiveFloat = 1.0  # one probe round per interval
    probe_timeout_s: PositiveFloat = 2.0  # connect + response of one /health probe
    max_concurrent_probes: PositiveInt = 64
    unroutable_after: PositiveInt = 3  # consecutive failures of a ready endpoint: not routed
    dead_after: PositiveInt = 30  # consecutive failures of a ready endpoint: job failed, removed
    publish_interval_s: PositiveFloat = 5.0  # full snapshots at least this often
    backoff_max_s: PositiveFloat = 10.0  # cap of the reconnect backoff to PostgreSQL/Redis
    # Also ask the launcher (configured by the [jobs] settings) whether jobs still exist. Off by
    # default: the Job Worker already ends job rows whose launcher job vanished.
    observe_launcher: bool = False
    observe_interval_s: PositiveFloat = 10.0
    # A second replica stands by (control/singleton.py): lock poll and check interval.
    standby_poll_s: Annotated[float, msgspec.Meta(gt=0, le=2.5)] = 1.0


class AdminSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``hpcgate admin``: the CLI client of the admin API. Unset URL and token are taken from
    the stack ``hpcgate up`` runs in ``data_dir`` (its stack.json and secrets.json), if any."""

    control_url: HttpUrl | None = None  # None: the up stack's, else DEFAULT_CONTROL_URL
    admin_token: str = ""
    data_dir: str = "var/up"  # where `hpcgate up` keeps its state (its default)
    log_level: LogLevel = "warning"
    timeout_s: PositiveFloat = 10.0


def require(value: str, name: str) -> str:
    """Fail start-up with a clear message when a required secret is empty."""
    if not value:
        raise SettingsError(f"missing setting HPCGATE_{name.upper()}: required by this process")
    return value
