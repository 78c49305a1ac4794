"""The gateway's typed settings (section ``gateway``: ``HPCGATE_GATEWAY_*``, ``[gateway]``).

Loaded once at start by :func:`load_gateway_settings` and passed down explicitly; nothing in the
gateway reads the environment elsewhere. Static endpoints are parsed here too, so a malformed
``--static-endpoint`` stops the process at start with the offending value named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from gateway.client_guard import parse_networks
from gateway.tls import server_context
from hpcgate.settings import LogLevel, Port, PositiveFloat, SettingsError, load_settings

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
RoutingPolicy = Literal["least-queue", "cache-aware"]
POLICIES: tuple[str, ...] = ("least-queue", "cache-aware")


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8000
    workers: PositiveInt = 1
    # "MODEL=URL[#token][,URL[#token]...]"; non-empty means static mode (no Redis, no PostgreSQL tables)
    static_endpoints: tuple[str, ...] = ()
    no_auth: bool = False
    # client side
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    max_upload_bytes: PositiveInt = 100 * 1024 * 1024  # a multipart upload (audio), relayed as it arrives
    max_header_count: PositiveInt = 100
    max_header_bytes: PositiveInt = 16 * 1024
    keep_alive_timeout_s: PositiveFloat = 5.0
    request_read_timeout_s: PositiveFloat = 10.0  # headers + body of one request (slowloris)
    client_send_timeout_s: PositiveFloat = 60.0  # a client that reads nothing for this long is cut
    limit_concurrency: PositiveInt = 10_000  # open client connections per worker; beyond: 503
    max_connections_per_address: NonNegInt = 2048  # per worker and client address; beyond: 503; 0: off
    auth_failures_per_minute: NonNegInt = 30  # failed API keys per client address; beyond: 429; 0: off
    # proxies in front (CIDRs): exempt from the per-address cap; their X-Forwarded-For names the client
    trusted_proxies: tuple[str, ...] = ()
    # upstream side
    upstream_connect_timeout_s: PositiveFloat = 5.0
    upstream_read_timeout_s: PositiveFloat = 300.0  # per read, never a total timeout on streams
    upstream_max_idle: PositiveInt = 512  # idle keep-alive connections kept per endpoint
    max_response_bytes: PositiveInt = 64 * 1024 * 1024  # buffered non-streaming response
    # committed streams relayed by a C thread (gateway.offload); false: by the event loop
    stream_offload: bool = True
    scrape_interval_s: PositiveFloat = 1.0
    max_retries: NonNegInt = 2
    retry_budget_ratio: Ratio = 0.2
    eject_after_failures: PositiveInt = 5
    eject_base_s: PositiveFloat = 5.0
    endpoint_max_inflight: NonNegInt = 0  # 0: no gateway-side cap per endpoint
    # routing policy: "least-queue" or "cache-aware" (docs/gateway.md, "Routing"); the default for
    # every model, and "MODEL=POLICY" entries for single models
    routing_policy: RoutingPolicy = "least-queue"
    routing_policy_models: tuple[str, ...] = ()
    prefix_block_bytes: Annotated[int, msgspec.Meta(ge=64)] = 1024  # cache-aware: bytes per index block
    prefix_max_imbalance: PositiveFloat = 16.0  # cache-aware: skip an instance this many requests deeper
    prefix_kv_saturated: Ratio = 0.95  # cache-aware: skip an instance whose KV cache is this full
    # cache-aware: how fast an instance works off prefill, in tokens of 4 bytes of prompt per second
    prefix_prefill_tokens_per_s: PositiveFloat = 20_000.0
    session_header: str = "x-session-id"  # cache-aware: a client's conversation id, used to break ties
    queue_max: NonNegInt = 256  # requests waiting per model when every instance is saturated
    queue_timeout_s: PositiveFloat = 10.0
    # scale from zero: how long a request for a model at zero instances is held (a model's own
    # hold_s, set through the admin API, wins); then 503 with Retry-After
    scale_from_zero_hold_s: PositiveFloat = 120.0
    # tenant limits (gateway.tenant_limits, gateway.lease_sync)
    tpm_completion_estimate: NonNegInt = 1024  # reserved for a request without max_tokens
    lease_interval_s: PositiveFloat = 0.5  # how often each worker leases budget from Redis
    lease_hold_s: PositiveFloat = 10.0  # a lease outlives Redis this long, then local shares
    quota_resync_s: PositiveFloat = 10.0  # monthly token use re-read from PostgreSQL
    # tables
    table_resync_s: PositiveFloat = 30.0
    # a worker restarted by its parent listens once it holds the tables, or after this long
    restart_table_wait_s: NonNegFloat = 30.0
    key_resync_s: PositiveFloat = 30.0
    redis_backoff_max_s: PositiveFloat = 5.0
    # accounting and lifecycle
    usage_flush_s: PositiveFloat = 2.0
    shutdown_timeout_s: PositiveFloat = 30.0
    access_log: bool = True
    # browser clients: origins allowed to call the API ("*": any); empty: no CORS headers at all
    cors_allowed_origins: tuple[str, ...] = ()
    # TLS on this port (both, PEM); unset: plain HTTP (a proxy in front terminates TLS)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # a bearer token that /metrics requires (Prometheus's bearer_token); unset: /metrics is open
    metrics_token: str | None = None
    # The Files and Batch APIs (docs/batch.md): relayed to the control API at this URL, with the
    # tenant vouched for by internal_token; None: /v1/files and /v1/batches answer 404.
    batch_api_url: str | None = None
    files_max_bytes: PositiveInt = 200 * 1024 * 1024  # an upload (413 beyond; the api checks it too)
    batch_api_timeout_s: PositiveFloat = 60.0  # connect + each read of the relayed exchange
    # vLLM "priority" given to batch requests on endpoints that announce priority scheduling
    # (lower runs first; interactive requests keep the default 0)
    batch_priority: int = 10
    # share of endpoint_max_inflight that batch requests leave free for interactive ones (a
    # request arriving then starts at once instead of waiting for a batch request to end)
    batch_headroom: Ratio = 0.1
    # common (no section prefix)
    internal_token: str | None = None  # batch runner -> gateway, gateway -> control API
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "hpcgate:"
    key_hash_secret: str | None = None
    log_level: LogLevel = "info"

    @property
    def static_mode(self) -> bool:
        return bool(self.static_endpoints)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


class StaticEndpoint(msgspec.Struct, frozen=True):
    model: str
    url: str
    host: str
    port: int
    bearer_token: str | None


def parse_static_endpoints(specs: Sequence[str]) -> tuple[StaticEndpoint, ...]:
    """``MODEL=URL[#token][,URL[#token]...]`` -> endpoints; raises SettingsError naming the spec."""
    out: list[StaticEndpoint] = []
    for spec in specs:
        model, sep, urls = spec.partition("=")
        model = model.strip()
        if not sep or not model or not urls.strip():
            raise SettingsError(f"invalid --static-endpoint {spec!r}: expected MODEL=URL[,URL...]")
        for item in urls.split(","):
            url, _, token = item.strip().partition("#")
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise SettingsError(f"invalid --static-endpoint {spec!r}: {url!r} is not an http:// URL")
            try:
                port = parts.port or 80
            except ValueError:
                raise SettingsError(f"invalid --static-endpoint {spec!r}: bad port in {url!r}") from None
            base = f"http://{parts.hostname}:{port}"
            out.append(StaticEndpoint(model, base, parts.hostname, port, token or None))
    return tuple(out)


def routing_policies(settings: GatewaySettings) -> dict[str, str]:
    """``MODEL=POLICY`` entries -> {model: policy}; raises SettingsError naming a bad entry."""
    out: dict[str, str] = {}
    for spec in settings.routing_policy_models:
        model, sep, policy = (part.strip() for part in spec.partition("="))
        if not sep or not model or policy not in POLICIES:
            raise SettingsError(f"invalid routing_policy_models entry {spec!r}: expected MODEL=POLICY with "
                                f"POLICY one of {', '.join(POLICIES)}")
        out[model] = policy
    return out


def load_gateway_settings(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> GatewaySettings:
    settings = load_settings(GatewaySettings, "gateway", env=env, overrides=overrides,
                             config_path=config_path)
    parse_static_endpoints(settings.static_endpoints)  # validate now, fail fast
    routing_policies(settings)
    try:
        parse_networks(settings.trusted_proxies)
    except ValueError as exc:
        raise SettingsError(f"invalid setting gateway.trusted_proxies: {exc}") from None
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise SettingsError("gateway.tls_cert_file and gateway.tls_key_file go together: set both or neither")
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            server_context(settings.tls_cert_file, settings.tls_key_file)
        except ValueError as exc:
            raise SettingsError(f"invalid TLS setting: {exc}") from None
    if not settings.static_mode and not settings.redis_url:
        raise SettingsError("HPCGATE_REDIS_URL is required without --static-endpoint (dynamic mode)")
    if settings.batch_api_url is not None:
        parts = urlsplit(settings.batch_api_url)
        if parts.scheme != "http" or not parts.hostname:
            raise SettingsError(f"invalid setting HPCGATE_GATEWAY_BATCH_API_URL: {settings.batch_api_url!r} "
                                "is not an http:// URL")
        if not settings.internal_token:
            raise SettingsError("HPCGATE_INTERNAL_TOKEN is required with a batch_api_url")
        if settings.no_auth:
            raise SettingsError("the Files and Batch APIs (batch_api_url) need API keys, not --no-auth")
    if not settings.no_auth:
        if not settings.key_hash_secret:
            raise SettingsError("HPCGATE_KEY_HASH_SECRET is required unless --no-auth")
        if not settings.database_url and not settings.redis_url:
            raise SettingsError("HPCGATE_DATABASE_URL or HPCGATE_REDIS_URL is required for API keys")
    return settings
