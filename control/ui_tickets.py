"""Signed, expiring values that let a browser reach the operator page without the admin token
ever appearing in a URL, a cookie or a browser's history.

``hpcgate admin ui`` (which holds the admin token) signs a short-lived *login ticket* and prints
the page's login URL with it; the control API checks the ticket, answers with a *session cookie*
(another signed value, longer-lived, HttpOnly) and redirects to the page. Both are
``<expiry unix seconds>.<hex HMAC-SHA256>`` keyed by the admin token with a purpose label, so:

- nothing is stored server-side, and several API replicas accept each other's cookies;
- a ticket cannot be used as a cookie or the other way round (different labels);
- rotating the admin token invalidates every ticket and session at once;
- a value past its expiry, malformed, or signed with another token is refused.

Pure functions of (token, purpose, time): unit-tested without a server.
"""

from __future__ import annotations

import hashlib
import hmac

LOGIN = "ui-login"
SESSION = "ui-session"
LOGIN_TTL_S = 300  # a printed link is good for five minutes
SESSION_TTL_S = 12 * 3600  # a working day at the console
_MAX_LEN = 100  # "<10 digits>.<64 hex>" with room; longer input is refused before any work


def _mac(token: str, purpose: str, expires: int) -> str:
    return hmac.new(token.encode(), f"{purpose}|{expires}".encode(), hashlib.sha256).hexdigest()


def sign(token: str, purpose: str, now: float, ttl_s: int) -> str:
    """A value for ``purpose`` that :func:`verify` accepts until ``now + ttl_s``."""
    expires = int(now) + ttl_s
    return f"{expires}.{_mac(token, purpose, expires)}"


def verify(token: str, purpose: str, value: str, now: float) -> bool:
    """Whether ``value`` was signed with ``token`` for ``purpose`` and has not expired."""
    if not token or len(value) > _MAX_LEN:
        return False
    expiry, _sep, mac = value.partition(".")
    if not expiry.isdigit() or not mac:
        return False
    expires = int(expiry)
    return now < expires and hmac.compare_digest(mac, _mac(token, purpose, expires))
