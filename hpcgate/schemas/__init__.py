"""Wire types shared by the data plane and the control plane.

This package is the bottom layer's wire contract: it imports only msgspec and the standard
library, so ``gateway`` and ``control`` both import it and neither imports the other.
Everything that crosses a process boundary between them is defined here: the published
endpoint and key tables (the tribunals' configuration rides with the endpoint table), their
Redis key names and the claim on them, and the keyed hash of API keys.
"""

from hpcgate.schemas.api_keys import KEY_PREFIX_LEN, hash_api_key, key_prefix, new_api_key
from hpcgate.schemas.tables import (
    DEPLOYMENT_CLAIM_SQL,
    ApiKeyEntry,
    EndpointEntry,
    EndpointTable,
    HeldRequests,
    KeyTable,
    ModelDemand,
    ModelEntry,
    ModelLimit,
    ModelState,
    RedisNames,
    TenantEntry,
    decode_model_limits,
)
from hpcgate.schemas.tribunal import TRIBUNAL_PREFIX, Juror, TribunalEntry

__all__ = [
    "DEPLOYMENT_CLAIM_SQL",
    "KEY_PREFIX_LEN",
    "TRIBUNAL_PREFIX",
    "ApiKeyEntry",
    "EndpointEntry",
    "EndpointTable",
    "HeldRequests",
    "Juror",
    "KeyTable",
    "ModelDemand",
    "ModelEntry",
    "ModelLimit",
    "ModelState",
    "RedisNames",
    "TenantEntry",
    "TribunalEntry",
    "decode_model_limits",
    "hash_api_key",
    "key_prefix",
    "new_api_key",
]
