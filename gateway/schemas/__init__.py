"""Wire types shared by the data plane and the control plane.

This package imports only msgspec and the standard library so that ``control`` can import it
without pulling in the gateway. Everything that crosses a process boundary between them is
defined here: the published endpoint and key tables, their Redis key names, and the keyed hash
of API keys.
"""

from gateway.schemas.api_keys import KEY_PREFIX_LEN, hash_api_key, key_prefix, new_api_key
from gateway.schemas.tables import (
    ApiKeyEntry,
    EndpointEntry,
    EndpointTable,
    KeyTable,
    ModelEntry,
    ModelState,
    RedisNames,
    TenantEntry,
)

__all__ = [
    "KEY_PREFIX_LEN",
    "ApiKeyEntry",
    "EndpointEntry",
    "EndpointTable",
    "KeyTable",
    "ModelEntry",
    "ModelState",
    "RedisNames",
    "TenantEntry",
    "hash_api_key",
    "key_prefix",
    "new_api_key",
]
