"""Settings of ``hpcgate control autoscaler`` (section ``autoscaler``: ``HPCGATE_AUTOSCALER_*``,
TOML ``[autoscaler]``). The policy fields are every model's defaults; the admin API overrides
them per model (``PATCH /admin/models/{name}/scaling``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from hpcgate.settings import LogLevel, PositiveFloat, PostgresUrl, RedisUrl

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]  # an ISO 8601 instant with its offset


class AutoscalerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: PostgresUrl = "postgresql://postgres@127.0.0.1:5432/hpcgate"
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "hpcgate:"
    log_level: LogLevel = "info"

    interval_s: PositiveFloat = 5.0  # one reconcile pass (scrape, decide, write) per interval
    scrape_timeout_s: PositiveFloat = 2.0  # one engine's /metrics, connect to last byte
    queue_time_window_s: PositiveFloat = 30.0  # mean queue time = Δsum / Δcount over this window
    demand_max_age_s: PositiveFloat = 5.0  # gateway demand older than this is ignored
    history_per_model: PositiveInt = 1000  # decisions kept per model
    outage_backoff_max_s: PositiveFloat = 10.0
    standby_poll_s: Annotated[float, msgspec.Meta(gt=0, le=2.5)] = 1.0
    # The clock schedules are judged by: wall time unless schedule_clock_start is set (for
    # demonstrations and `hpcgate bench day`): then a simulated clock reads schedule_clock_start
    # at the wall instant schedule_clock_origin (default: when the autoscaler started) and runs
    # schedule_clock_speed times faster. Only schedules see it; every window stays in wall time.
    schedule_clock_start: AwareDatetime | None = None
    schedule_clock_origin: AwareDatetime | None = None
    schedule_clock_speed: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 1.0

    # policy defaults (control/autoscale/policy.py PolicyConfig)
    mode: Literal["queue_time", "target"] = "queue_time"
    scale_up_queue_time_s: PositiveFloat = 5.0
    scale_up_sustain_s: NonNegativeFloat = 30.0
    scale_down_stabilise_s: NonNegativeFloat = 300.0
    scale_down_running_per_instance: NonNegativeFloat = 1.0
    cooldown_s: NonNegativeFloat = 60.0
    max_pending: PositiveInt = 1
    pending_report_s: PositiveFloat = 900.0
    target_waiting_per_instance: PositiveFloat = 4.0
    stable_window_s: PositiveFloat = 60.0
    panic_window_s: PositiveFloat = 6.0
    panic_threshold: PositiveFloat = 2.0
    early_scale_up: bool = False  # judge the queue time expected when a new instance could serve
