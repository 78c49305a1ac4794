"""The autoscaler's reconcile pass: observe every active model, decide, write, explain.

One pass: read the active models with their ready endpoints and pending jobs (PostgreSQL), read
the gateways' demand (Redis, ``<prefix>demand:*``), scrape each ready endpoint's ``/metrics``
concurrently, build each model's :class:`~control.autoscale.policy.Signals`, ask the policy, and
apply a change with a compare-and-set plus a history row. A model's schedule (its text in
``ai_model_autoscaling.schedule``) narrows its min and max for the current instant first; a
change forced by a schedule is recorded with source ``schedule`` (lowering desired drains the
extra instances through the Job Worker's drain-then-cancel path: no stream is cut). Every change is one
``autoscaler_decision`` log line with its inputs and rule; every model's last observation is
stored for the admin API and the metrics.

Faults: an engine that cannot be scraped makes its model's load unknown (the policy then holds);
Redis unreachable means no gateway demand is known, so no model is scaled down on that pass
(its demand might be hidden) and the outage is logged once; PostgreSQL unreachable fails the
pass (the caller backs off, logs once, and catches up when it returns). The policy's memory
(:class:`PolicyState`) lives here, per model id, and restarts empty with a new leader: a
sustain or stabilisation window then begins again, which errs on the side of not acting.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import httpx
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control.autoscale import store
from control.autoscale.policy import Outcome, PolicyConfig, PolicyState, Signals, decide
from control.autoscale.schedule import Schedule, ScheduleClock, ScheduleError
from control.autoscale.schedule import parse as parse_schedule
from control.autoscale.settings import AutoscalerSettings
from control.autoscale.signals import Endpoint, QueueTimeWindow, build_signals, total_demand
from control.http_client import BodyTooLargeError, daemon_client, node_url, read_capped
from control.store.db import OutageLog
from hpcgate.logs import get_logger
from hpcgate.metrics_text import EngineLoad, parse_engine_load
from hpcgate.schemas import ModelDemand, RedisNames

log = get_logger("hpcgate.control.autoscaler")
_MAX_PAGE = 4 << 20
_decode_demand = msgspec.json.Decoder(ModelDemand).decode


def policy_defaults(s: AutoscalerSettings) -> PolicyConfig:
    fields = set(PolicyConfig.__struct_fields__) - {"min_instances", "max_instances"}
    return PolicyConfig(**{f: getattr(s, f) for f in fields})


class Autoscaler:
    def __init__(
        self, settings: AutoscalerSettings, pool: asyncpg.Pool, http: httpx.AsyncClient, redis: aioredis.Redis
    ) -> None:
        self.settings = settings
        self._pool = pool
        self._http = http
        self._redis = redis
        self._names = RedisNames(settings.redis_prefix)
        self._defaults = policy_defaults(settings)
        self._states: dict[int, PolicyState] = {}
        self._windows: dict[int, QueueTimeWindow] = {}
        self._redis_outage = OutageLog("redis", log)  # said once per outage, and once recovered
        self._reported: set[int] = set()  # models whose overdue pending job was reported
        self._schedules: dict[int, tuple[str, Schedule]] = {}  # parsed once per text
        self._clock = ScheduleClock(
            settings.schedule_clock_start,
            settings.schedule_clock_origin or datetime.now(UTC),
            settings.schedule_clock_speed,
        )

    async def reconcile_once(self) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        async with self._pool.acquire() as conn:
            models = await store.active_models(conn)
        demand = await self._demand()
        endpoints = {ep.endpoint_id: ep for m in models for ep in m.observation.ready}
        pages = await asyncio.gather(*(self._scrape(ep) for ep in endpoints.values()))
        now = loop.time()
        loads = dict(zip(endpoints, pages, strict=True))
        for eid, load in loads.items():
            if load is not None and load.queue_time_sum is not None and load.queue_time_count is not None:
                window = self._windows.get(eid)
                if window is None:
                    window = self._windows[eid] = QueueTimeWindow(self.settings.queue_time_window_s)
                window.observe(now, load.queue_time_sum, load.queue_time_count)
        for eid in [e for e in self._windows if e not in endpoints]:
            del self._windows[eid]
        for mid in [m for m in self._states if m not in {r.model_id for r in models}]:
            del self._states[mid]
        outcomes = []
        for row in models:
            if demand is None:
                held, oldest = 0, None
            else:
                held, oldest = total_demand(
                    row.name, row.aliases, demand, time.time(), self.settings.demand_max_age_s
                )
            signals = build_signals(
                now,
                row.observation,
                loads,
                self._windows,
                held=held,
                oldest_held_s=oldest,
                min_window_s=self.settings.queue_time_window_s / 2,
            )
            if demand is None:  # gateway demand unknown: the load may be hidden
                signals = msgspec.structs.replace(signals, known=False)
            outcomes.append(await self._decide(row, signals))
        return outcomes

    def _schedule(self, row: store.ModelRow) -> Schedule | None:
        if not row.schedule:
            return None
        cached = self._schedules.get(row.model_id)
        if cached is None or cached[0] != row.schedule:
            try:
                cached = (row.schedule, parse_schedule(row.schedule))
            except ScheduleError as exc:  # the admin API validates; a hand-edited row is ignored
                log.warning("autoscaler_schedule_invalid", model=row.name, error=str(exc))
                cached = (row.schedule, Schedule(()))
            self._schedules[row.model_id] = cached
        return cached[1]

    async def _decide(self, row: store.ModelRow, signals: Signals) -> Outcome:
        cfg = store.policy_config(self._defaults, row)
        schedule = self._schedule(row)
        limits = None
        if schedule is not None:
            limits = schedule.limits(self._clock.at(datetime.now(UTC)), row.min_instances, row.max_instances)
            cfg = msgspec.structs.replace(
                cfg, min_instances=limits.min_instances, max_instances=limits.max_instances
            )
        state = self._states.setdefault(row.model_id, PolicyState())
        out = decide(cfg, state, signals, row.desired)
        source = "autoscaler"
        if out.changed and out.reason in {"below_min", "above_max"} and limits is not None and limits.rule:
            source = "schedule"
            out = msgspec.structs.replace(
                out,
                reason="schedule",
                detail=(
                    f"{out.detail} (schedule rule {limits.rule!r}: min {limits.min_instances}, "
                    f"max {limits.max_instances})"
                ),
            )
        async with self._pool.acquire() as conn:
            if out.changed:
                assert out.reason is not None
                applied = await store.apply_decision(
                    conn,
                    row.model_id,
                    row.desired,
                    out.desired,
                    reason=out.reason,
                    source=source,
                    detail=out.detail,
                    signals=signals,
                    keep=self.settings.history_per_model,
                )
                log.info(
                    "autoscaler_decision",
                    model=row.name,
                    old=row.desired,
                    new=out.desired,
                    reason=out.reason,
                    source=source,
                    rule=out.detail,
                    applied=applied,
                    ready=signals.ready,
                    pending=signals.pending,
                    queue_time_s=signals.queue_time_s,
                    stalled_s=signals.stalled_s,
                    waiting=signals.waiting,
                    running=signals.running,
                    kv_usage=signals.kv_usage,
                    held=signals.held,
                    oldest_held_s=signals.oldest_held_s,
                    known=signals.known,
                )
                if not applied:
                    state.last_change_at = None  # nothing changed: no cooldown from it
            await store.record_status(
                conn,
                row.model_id,
                signals,
                hold=out.hold,
                detail=out.detail,
                pending_overdue=out.pending_overdue,
            )
        if out.pending_overdue and row.model_id not in self._reported:
            log.warning(
                "autoscaler_pending_overdue",
                model=row.name,
                pending=signals.pending,
                oldest_pending_s=signals.oldest_pending_s,
                limit_s=cfg.pending_report_s,
            )
            self._reported.add(row.model_id)
        elif not out.pending_overdue:
            self._reported.discard(row.model_id)
        return out

    async def _demand(self) -> list[ModelDemand] | None:
        """Every gateway worker's demand document; None if Redis cannot be read."""
        try:
            keys = [k async for k in self._redis.scan_iter(match=f"{self._names.demand_prefix}*", count=500)]
            raw = await self._redis.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            self._redis_outage.failed(exc)
            return None
        self._redis_outage.ok()
        docs = []
        for value in raw:
            if value is None:
                continue
            try:
                docs.append(_decode_demand(value))
            except msgspec.DecodeError:
                continue  # a foreign or truncated key is not demand
        return docs

    async def _scrape(self, ep: Endpoint) -> EngineLoad | None:
        headers = {"authorization": f"Bearer {ep.bearer_token}"} if ep.bearer_token else {}
        try:
            async with asyncio.timeout(self.settings.scrape_timeout_s):
                async with self._http.stream(
                    "GET", node_url(ep.node, ep.port, "/metrics"), headers=headers
                ) as response:
                    if response.status_code != 200:
                        return None
                    return parse_engine_load(await read_capped(response, _MAX_PAGE))
        except (httpx.HTTPError, BodyTooLargeError, TimeoutError, OSError):
            return None


def make_http(settings: AutoscalerSettings) -> httpx.AsyncClient:
    return daemon_client(settings.scrape_timeout_s, max_connections=64)
