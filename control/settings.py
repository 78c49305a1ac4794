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
DEFAULT_BATCH_DIR = "var/batch"

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
    # The Files and Batch APIs (control/batch/api.py, docs/batch.md), reached through the gateway.
    internal_token: str = ""  # the gateways' shared secret; empty: /v1/files and /v1/batches refuse
    batch_dir: str = DEFAULT_BATCH_DIR
    files_max_bytes: PositiveInt = 200 * 1024 * 1024  # one upload; beyond: 413
    files_retention_s: PositiveFloat = 30 * 86400.0  # files are deleted this long after upload
    tenant_max_stored_bytes: PositiveInt = 10 * 1024**3  # a tenant's files together; beyond: 413
    tenant_max_active_batches: PositiveInt = 16  # validating/in_progress/finalizing/cancelling
    batch_max_window_h: Annotated[int, msgspec.Meta(ge=24)] = 24  # longest completion_window allowed
    # POST /hooks/grafana (the paper's alert webhook): its own bearer token (empty: the hook
    # refuses every call) and the cooldown after any change of a model's desired count (a
    # model's own cooldown_s override wins), as the autoscaler's.
    grafana_webhook_token: str = ""
    webhook_cooldown_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    webhook_history_per_model: PositiveInt = 1000

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


class BatchRunnerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``hpcgate control batches``: the batch runner (``HPCGATE_BATCHES_*``, ``[batches]``)."""

    database_url: PostgresUrl = DEFAULT_DATABASE_URL
    internal_token: str = ""  # presented to the gateway with each batch request; required
    batch_dir: str = DEFAULT_BATCH_DIR
    log_level: LogLevel = "info"
    gateway_url: HttpUrl = "http://127.0.0.1:8000"  # batch requests go through the gateway
    poll_s: PositiveFloat = 1.0  # how often idle runners look for work
    lease_s: PositiveFloat = 30.0  # a claimed line's lease; renewed while its request runs
    max_lines: PositiveInt = 50_000  # lines per batch
    max_errors: PositiveInt = 100  # validation errors reported in errors.data
    files_retention_s: PositiveFloat = 30 * 86400.0  # output and error files, as the api's uploads
    # Concurrency per model: starts at min, grows by one per step while the engines have no
    # waiting requests, halves as soon as they do (AIMD), never above max.
    min_concurrency: PositiveInt = 1
    max_concurrency: PositiveInt = 64
    control_step_s: PositiveFloat = 1.0
    # Engines' waiting requests tolerated, as a share of their running ones (at least 1): a
    # request arriving between two engine steps waits until the next; more is a queue.
    waiting_tolerance: Annotated[float, msgspec.Meta(ge=0)] = 0.25
    contention_steps: PositiveInt = 3  # control steps in a row with a queue before backing off
    request_timeout_s: PositiveFloat = 600.0
    max_attempts: PositiveInt = 3  # a line that gets 429/5xx/connection errors, before the error file
    cancel_grace_s: PositiveFloat = 60.0  # in-flight lines of a cancelled/expired batch, then abandoned
    db_pool_size: PositiveInt = 4
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 0  # Prometheus /metrics of the runner; 0: not served


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
