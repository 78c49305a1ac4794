"""A request's tenant admission: tenant limits, the tenant's limits on the model, monthly quota.

:class:`TenantAdmission` admits a request against up to three budgets and hands back one
:class:`Admission` that settles all of them with the real token count at the end. Each budget
reserves the request's estimate up front (:mod:`gateway.tenant_limits`). Refused by any: the
ones already taken are given back at once.

Monthly quota (tokens per calendar month, UTC). The month's use per tenant comes from
PostgreSQL (what every gateway flushed to ``usage_records``), loaded off the hot path every
``quota_resync_s`` (:meth:`QuotaBook.load`); between loads each worker adds what it reserved
and spent itself. A request is admitted while ``used + spent here + its estimate <= quota``
(429 ``insufficient_quota``). Bound: a tenant can exceed its quota by what the other workers
spent since the last load plus what was not flushed yet, i.e. its cluster-wide token rate
times (``quota_resync_s`` + ``usage_flush_s``), which its TPM limit caps if it has one.
"""

from __future__ import annotations

from gateway.auth import Principal
from gateway.errors import ApiError
from gateway.tenant_limits import Reservation, TenantLimiter


class QuotaBook:
    """This worker's view of each tenant's monthly use."""

    __slots__ = ("in_flight", "loaded", "spent", "used")

    def __init__(self) -> None:
        self.used: dict[int, int] = {}  # tenant -> tokens of this month in PostgreSQL at the last load
        self.spent: dict[int, int] = {}  # tenant -> tokens reserved or spent here since that load
        self.in_flight: dict[int, int] = {}  # tenant -> tokens reserved by requests still running
        self.loaded = False

    def reserve(self, p: Principal, estimate: int) -> int:
        quota = p.monthly_quota
        assert quota is not None
        tid = p.tenant_id
        spent = self.spent.get(tid, 0)
        left = quota - self.used.get(tid, 0) - spent
        if estimate > left:
            raise ApiError(429, f"monthly token quota of this tenant exhausted: {max(0, left)} of {quota} "
                           f"tokens left, this request may use up to {estimate} (lower max_tokens, or wait "
                           "for next month)", "insufficient_quota")
        self.spent[tid] = spent + estimate
        self.in_flight[tid] = self.in_flight.get(tid, 0) + estimate
        return estimate

    def settle(self, tenant_id: int, reserved: int, tokens: int) -> None:
        self.spent[tenant_id] = self.spent.get(tenant_id, 0) + tokens - reserved
        left = self.in_flight[tenant_id] - reserved
        if left:
            self.in_flight[tenant_id] = left
        else:
            del self.in_flight[tenant_id]

    def load(self, used: dict[int, int], unflushed: dict[int, int]) -> None:
        """A fresh read of the month's use; what this worker has not flushed yet (``unflushed``)
        or still has in flight is not in it and stays counted here."""
        self.used = used
        inf = self.in_flight
        self.spent = {t: unflushed.get(t, 0) + inf.get(t, 0) for t in unflushed.keys() | inf.keys()}
        self.loaded = True


class Admission:
    __slots__ = ("book", "model", "quota", "tenant", "tenant_id")

    def __init__(self, book: QuotaBook, tenant_id: int) -> None:
        self.book = book
        self.tenant_id = tenant_id
        self.tenant: Reservation | None = None
        self.model: Reservation | None = None
        self.quota = 0  # tokens reserved against the monthly quota

    def leave(self, tokens: int) -> None:
        """The request ended having used ``tokens`` (0 if it never ran): settle every budget."""
        TenantLimiter.leave(self.tenant, tokens)
        TenantLimiter.leave(self.model, tokens)
        if self.quota:
            self.book.settle(self.tenant_id, self.quota, tokens)
            self.quota = 0


class TenantAdmission:
    __slots__ = ("limiter", "quotas")

    def __init__(self, limiter: TenantLimiter) -> None:
        self.limiter = limiter
        self.quotas = QuotaBook()

    def admit(self, p: Principal, model: str, now: float, estimate: int) -> Admission:
        """Admit a request of ``p`` on ``model`` (canonical name), or raise 429."""
        adm = Admission(self.quotas, p.tenant_id)
        try:
            adm.tenant = self.limiter.enter(p, now, estimate)
            lim = p.model_limits.get(model)
            if lim is not None:
                adm.model = self.limiter.enter_key(f"{p.tenant_id}/{model}", lim.tokens_per_minute,
                                                   lim.max_concurrent_requests, now, estimate=estimate,
                                                   scope=f"this tenant on model '{model}'")
            if p.monthly_quota is not None:
                adm.quota = self.quotas.reserve(p, estimate)
        except ApiError:
            adm.leave(0)
            raise
        return adm
