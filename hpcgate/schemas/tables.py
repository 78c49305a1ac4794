"""The snapshots the control plane publishes and every gateway holds in memory.

Both tables are full snapshots, never deltas. ``version`` comes from a PostgreSQL sequence, so
it only grows, across restarts and even with two publishers running; a gateway swaps in a
snapshot only if its version is greater than the one it holds. A snapshot is stored under a
Redis key (so a starting gateway can read it before subscribing) and announced on a pub/sub
channel whose message is the version as ASCII digits.
"""

from __future__ import annotations

import enum

import msgspec

from hpcgate.schemas.tribunal import TribunalEntry


class ModelState(enum.StrEnum):
    READY = "ready"  # at least one ready endpoint
    STARTING = "starting"  # instances wanted, none ready yet (includes scaling from zero)
    STOPPED = "stopped"  # no instance wanted
    FAILED = "failed"  # jobs keep failing; see reason


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    aliases: tuple[str, ...] = ()
    state: ModelState = ModelState.STOPPED
    reason: str | None = None
    max_model_len: int | None = None
    # Scale from zero: a request that finds no ready instance is held (up to hold_s, or the
    # gateway's default when None) and announced as demand, instead of answered 503 at once.
    scale_from_zero: bool = False
    hold_s: float | None = None


class EndpointEntry(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_id: int
    model: str
    url: str  # base URL, e.g. "http://node01:8123"
    node: str
    port: int
    endpoint_job_id: int
    launcher_job_id: str | None = None
    bearer_token: str | None = None  # what the vLLM behind it requires
    ready: bool = False
    draining: bool = False  # finishing in-flight requests, gets no new ones
    priority: bool = False  # the engine honours vLLM's request "priority" (--scheduling-policy priority)


class EndpointTable(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    generated_at: float  # unix time, for the gateway's "table age" metric
    models: tuple[ModelEntry, ...] = ()
    endpoints: tuple[EndpointEntry, ...] = ()
    tribunals: tuple[TribunalEntry, ...] = ()  # virtual models "tribunal/<name>" (issue 17)


class ModelLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tenant's limits on one model, on top of its tenant-wide limits."""

    max_concurrent_requests: int | None = None
    tokens_per_minute: int | None = None


_decode_model_limits = msgspec.json.Decoder(dict[str, ModelLimit]).decode


def decode_model_limits(text: str | None) -> dict[str, ModelLimit]:
    """The ``identity_tenants.model_limits`` jsonb column (as text) as typed limits."""
    return _decode_model_limits(text) if text else {}


class TenantEntry(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: int
    name: str
    enabled: bool = True
    allowed_models: tuple[str, ...] | None = None  # None: every model
    max_concurrent_requests: int | None = None
    tokens_per_minute: int | None = None
    model_limits: dict[str, ModelLimit] = msgspec.field(default_factory=dict)  # by canonical model name
    monthly_token_quota: int | None = None  # prompt + completion tokens per calendar month (UTC)


class ApiKeyEntry(msgspec.Struct, frozen=True, kw_only=True):
    key_hash: str  # hex of hash_api_key(); never the key itself
    prefix: str
    tenant_id: int
    expires_at: float | None = None  # unix time


class KeyTable(msgspec.Struct, frozen=True, kw_only=True):
    """Active keys only: revoked keys and keys of disabled tenants are left out."""

    version: int
    generated_at: float
    tenants: tuple[TenantEntry, ...] = ()
    keys: tuple[ApiKeyEntry, ...] = ()


# This database's claim on a Redis prefix, "<deployment id> <database>" (migration 1200): what the
# publisher writes to ``RedisNames.owner`` and what a gateway of the same deployment expects there.
DEPLOYMENT_CLAIM_SQL = "SELECT deployment_id::text || ' ' || current_database() FROM deployment_identity"


class RedisNames:
    """Redis keys and channels under a deployment's prefix (``redis_prefix``, e.g. "hpcgate:")."""

    __slots__ = ("demand_prefix", "endpoint_table", "endpoint_table_channel", "key_table",
                 "key_table_channel", "owner", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # "<deployment id> <database>" of the deployment that publishes here, with an expiry
        self.owner = f"{prefix}owner"
        self.endpoint_table = f"{prefix}endpoint_table"
        self.endpoint_table_channel = f"{prefix}endpoint_table:version"
        self.key_table = f"{prefix}key_table"
        self.key_table_channel = f"{prefix}key_table:version"
        # one key per gateway worker, ``<demand_prefix><host>:<pid>``, holding a ModelDemand
        self.demand_prefix = f"{prefix}demand:"


class HeldRequests(msgspec.Struct, frozen=True, array_like=True):
    held: int  # requests held in the worker's model queue
    oldest_s: float  # how long the oldest of them has waited


class ModelDemand(msgspec.Struct, frozen=True, kw_only=True):
    """What one gateway worker holds per model, published about once a second with an expiry
    (a worker that dies stops counting by itself). Read by the autoscaler."""

    at: float  # unix time
    models: dict[str, HeldRequests] = {}
