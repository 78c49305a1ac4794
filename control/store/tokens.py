"""One-time registration tokens: how the Job Worker stores them and the API checks them.

A token is 256 random bits (``new_registration_token``) handed to exactly one job; only its
SHA-256 is stored (``ai_model_endpoint_jobs.registration_token_hash``). A keyed hash is not
needed: the token is random and single-use, so the hash cannot be brute-forced or replayed.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_BYTES = 32


def new_registration_token() -> str:
    """A fresh URL-safe token (43 characters) for one endpoint job."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_registration_token(token: str) -> bytes:
    """The 32-byte digest stored in ``registration_token_hash`` and compared on registration."""
    return hashlib.sha256(token.encode()).digest()
