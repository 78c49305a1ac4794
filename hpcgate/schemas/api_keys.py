"""API keys: generation, the visible prefix, and the keyed hash stored instead of the key.

Invariants: a key is ``hpg_`` followed by 43 URL-safe base64 characters (256 random bits); only
``HMAC-SHA256(secret, key)`` and the first :data:`KEY_PREFIX_LEN` characters are ever stored.
The gateway computes the same hash for an incoming key and looks it up in a dict, so no
comparison of secret material happens in Python code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_SCHEME = "hpg_"
KEY_PREFIX_LEN = 12  # "hpg_" + 8 random characters: enough to find a key, useless to guess it


def new_api_key() -> str:
    return KEY_SCHEME + secrets.token_urlsafe(32)


def key_prefix(key: str) -> str:
    return key[:KEY_PREFIX_LEN]


def hash_api_key(secret: bytes, key: str | bytes) -> bytes:
    """The 32-byte keyed hash under which a key is stored and looked up."""
    raw = key.encode() if isinstance(key, str) else key
    return hmac.new(secret, raw, hashlib.sha256).digest()
