"""Abuse limits per client address: open connections, and failed API-key attempts.

Both are in-memory, per worker, with no database or Redis call: a connection costs one dict
update when it opens and one when it closes; a request pays a dict lookup only while some
address has failed recently (the failure table is empty otherwise).

- :class:`ConnectionCounter` caps the open connections of one address (beyond: 503), under the
  server's overall cap (``limit_concurrency``), so one client cannot take every descriptor.
- :class:`FailedAuthLimiter` counts failed API keys per address in fixed windows; at ``limit``
  failures the address gets 429 with ``Retry-After`` until its window ends, whatever key it
  sends, so guessing keys is slowed to ``limit`` tries a minute per address and per worker.
  Other addresses are never affected. The table is bounded (``max_tracked``) and pruned once a
  second.

Behind a proxy every connection comes from the proxy: addresses in ``trusted_proxies`` are
exempt from the connection cap, and for them the client is the last address of
``X-Forwarded-For`` (what the proxy appended). Invariant: a count never goes below zero and an
address with no open connection has no entry.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(specs: Sequence[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses -> networks; ``ValueError`` names a bad one."""
    out: list[Network] = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{spec!r} is not an IP address or CIDR network") from None
    return tuple(out)


class TrustedProxies:
    __slots__ = ("_cache", "_networks")

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, address: str) -> bool:
        if not self._networks:
            return False
        known = self._cache.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in net for net in self._networks)
            if len(self._cache) < 4096:  # proxies are few; clients passing through are not cached
                self._cache[address] = known
        return known


def forwarded_client(peer: str, forwarded_for: bytes | None) -> str:
    """The client behind a trusted proxy: the last ``X-Forwarded-For`` entry, else the peer."""
    if not forwarded_for:
        return peer
    last = forwarded_for.rpartition(b",")[2].strip()
    return last.decode("ascii", "replace")[:64] if last else peer


class ConnectionCounter:
    __slots__ = ("_open", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no per-address cap
        self._open: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False (nothing counted) when it is at its cap."""
        count = self._open.get(address, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self._open.get(address, 0)
        if count <= 1:
            self._open.pop(address, None)
        else:
            self._open[address] = count - 1

    def open(self, address: str) -> int:
        return self._open.get(address, 0)

    def __len__(self) -> int:
        return len(self._open)


class FailedAuthLimiter:
    __slots__ = ("_windows", "limit", "max_tracked", "window_s")

    def __init__(self, limit: int, window_s: float = 60.0, max_tracked: int = 65_536) -> None:
        self.limit = limit  # failures per window; 0: no limit
        self.window_s = window_s
        self.max_tracked = max_tracked
        self._windows: dict[str, list[float]] = {}  # address -> [window start, failures]

    @property
    def active(self) -> bool:
        """Whether any address failed recently (only then does a request need its address)."""
        return bool(self._windows)

    def retry_after(self, address: str, now: float) -> int | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        entry = self._windows.get(address)
        if entry is None or entry[1] < self.limit:
            return None
        left = entry[0] + self.window_s - now
        return math.ceil(left) if left > 0 else None

    def failed(self, address: str, now: float) -> None:
        if not self.limit:
            return
        entry = self._windows.get(address)
        if entry is None or now >= entry[0] + self.window_s:
            if entry is None and len(self._windows) >= self.max_tracked:
                return  # full of recent offenders: a new address goes uncounted until the prune
            self._windows[address] = [now, 1.0]
        else:
            entry[1] += 1

    def prune(self, now: float) -> None:
        """Forget addresses whose window has ended (called once a second)."""
        if self._windows:
            horizon = now - self.window_s
            for address in [a for a, e in self._windows.items() if e[0] <= horizon]:
                del self._windows[address]

    def __len__(self) -> int:
        return len(self._windows)
