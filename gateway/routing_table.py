"""The immutable routing table of one snapshot: model name or alias -> route, one dict lookup.

Built off the hot path whenever a new endpoint table arrives (or once, in static mode), then
swapped in by replacing one reference; readers never lock and never scan. Aliases are resolved
here, so a request's model costs exactly one lookup. Tribunals (virtual models) are in their own
dict, read only when that lookup missed. Backends are reused across tables through
the caller's registry (see :mod:`gateway.backend`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway.backend import Backend, BackendKey
from hpcgate.schemas import EndpointTable, ModelState, TribunalEntry

# Retry-After seconds for a model whose instances are starting (or briefly unroutable). A model
# that is stopped or failed gets none: nothing will change until an operator acts.
RETRY_AFTER_STARTING = 10


class ModelRoute:
    __slots__ = ("aliases", "backends", "max_model_len", "name", "reason", "state")

    def __init__(self, name: str, state: ModelState, backends: tuple[Backend, ...],
                 aliases: tuple[str, ...] = (), reason: str | None = None, *,
                 max_model_len: int | None = None) -> None:
        self.max_model_len = max_model_len
        self.name = name
        self.state = state
        self.backends = backends
        self.aliases = aliases
        self.reason = reason


class RoutingTable:
    __slots__ = ("_routes", "generated_at", "models", "tribunals", "version")

    def __init__(self, version: int, generated_at: float, models: Iterable[ModelRoute],
                 tribunals: Iterable[TribunalEntry] = ()) -> None:
        self.version = version
        # "tribunal/<name>" -> configuration. Looked up only after the model lookup missed, so
        # a request for a real model never touches it (see gateway.proxy).
        self.tribunals = {t.model: t for t in tribunals}
        self.generated_at = generated_at
        self.models = tuple(models)
        routes: dict[str, ModelRoute] = {}
        for route in self.models:
            for alias in route.aliases:
                routes.setdefault(alias, route)
        for route in self.models:
            routes[route.name] = route  # a canonical name wins over someone's alias
        self._routes = routes

    def lookup(self, model: str) -> ModelRoute | None:
        return self._routes.get(model)

    @property
    def backends(self) -> set[Backend]:
        return {b for route in self.models for b in route.backends}


EMPTY = RoutingTable(0, 0.0, ())


def table_from_snapshot(
    snap: EndpointTable, backend_for: Callable[[BackendKey, str, int], Backend]
) -> RoutingTable:
    """Index a published snapshot; ``backend_for((url, token), host, port)`` reuses or makes one."""
    by_model: dict[str, list[Backend]] = {}
    for ep in snap.endpoints:
        if ep.ready and not ep.draining:
            backend = backend_for((ep.url.rstrip("/"), ep.bearer_token), ep.node, ep.port)
            by_model.setdefault(ep.model, []).append(backend)
    routes: list[ModelRoute] = []
    seen: set[str] = set()
    for entry in snap.models:
        ready = tuple(by_model.get(entry.name, ()))
        state = ModelState.READY if ready else (
            entry.state if entry.state != ModelState.READY else ModelState.STARTING
        )
        routes.append(ModelRoute(entry.name, state, ready, entry.aliases, entry.reason,
                                 max_model_len=entry.max_model_len))
        seen.add(entry.name)
    for name, listed in by_model.items():
        if name not in seen:  # an endpoint for a model the snapshot does not describe: still route it
            routes.append(ModelRoute(name, ModelState.READY, tuple(listed)))
    for route in routes:
        for b in route.backends:
            b.models = b.models | {route.name}
    return RoutingTable(snap.version, snap.generated_at, routes, snap.tribunals)
