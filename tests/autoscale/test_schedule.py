"""Schedules on a fake clock: windows in local time with daylight saving, past midnight, the
otherwise rule, clamping into the model's limits, and the reasons a schedule is refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from control.autoscale.schedule import ScheduleError, parse

OFFICE = """
# office hours in Berlin, nights handed back to research jobs
weekdays 08:00-19:00 Europe/Berlin: min 2
daily 22:00-06:00 Europe/Berlin: max 0
otherwise: max 1
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_local_windows_follow_daylight_saving_time() -> None:
    s = parse(OFFICE)
    # Friday 27 March 2026 is CET (UTC+1); Monday 30 March is CEST (UTC+2)
    assert s.limits(at("2026-03-27T06:59"), 0, 4).rule == "otherwise: max 1"  # 07:59 local
    assert s.limits(at("2026-03-27T07:00"), 0, 4).min_instances == 2  # 08:00 local
    assert s.limits(at("2026-03-30T06:00"), 0, 4).min_instances == 2  # 08:00 local (CEST)
    assert s.limits(at("2026-03-30T05:59"), 0, 4).min_instances == 0  # 07:59 local
    assert s.limits(at("2026-03-30T16:59"), 0, 4).min_instances == 2  # 18:59 local
    assert s.limits(at("2026-03-30T17:00"), 0, 4).rule == "otherwise: max 1"  # 19:00 local
    # Saturday at noon: no window, the otherwise rule
    assert (lim := s.limits(at("2026-03-28T11:00"), 0, 4)).max_instances == 1 and lim.min_instances == 0


def test_windows_past_midnight_belong_to_the_day_they_start() -> None:
    s = parse("fri 22:00-06:00 UTC: max 0")
    assert s.limits(at("2026-03-27T23:00"), 0, 3).max_instances == 0  # Friday night
    assert s.limits(at("2026-03-28T05:59"), 0, 3).max_instances == 0  # Saturday morning
    assert s.limits(at("2026-03-28T06:00"), 0, 3).rule is None
    assert s.limits(at("2026-03-26T23:00"), 0, 3).rule is None  # Thursday night
    daily = parse("daily 22:00-06:00 Europe/Berlin: max 0")
    # the night of the autumn change (25 Oct 2026, 03:00 CEST -> 02:00 CET) stays covered
    for hour in ("2026-10-24T20:00", "2026-10-25T00:30", "2026-10-25T01:30", "2026-10-25T04:59"):
        assert daily.limits(at(hour), 0, 3).max_instances == 0, hour
    assert daily.limits(at("2026-10-25T05:00"), 0, 3).rule is None  # 06:00 CET


def test_a_schedule_narrows_the_model_limits_never_widens_them() -> None:
    s = parse("daily 00:00-24:00 UTC: min 5")
    assert (
        s.limits(at("2026-03-27T12:00"), 1, 3).min_instances,
        s.limits(at("2026-03-27T12:00"), 1, 3).max_instances,
    ) == (3, 3)
    s = parse("daily 00:00-24:00 UTC: max 0")
    lim = s.limits(at("2026-03-27T12:00"), 1, 3)
    assert (lim.min_instances, lim.max_instances) == (1, 1)  # the model's min stands
    assert parse("").limits(at("2026-03-27T12:00"), 0, 2).rule is None
    assert (
        parse("sat,sun 10:00-12:00 UTC: min 1, max 1").limits(at("2026-03-28T11:00"), 0, 2).min_instances == 1
    )
    assert (
        parse("mon,wed-fri 10:00-12:00 UTC: min 1").limits(at("2026-03-24T11:00"), 0, 2).rule is None
    )  # Tue


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("weekdays 08:00-19:00 Mars/Olympus: min 2", "line 1: unknown time zone 'Mars/Olympus'"),
        ("weekdays 25:00-19:00 UTC: min 2", "line 1: '25:00' is not a time of day"),
        ("someday 08:00-19:00 UTC: min 2", "line 1: unknown days 'someday'"),
        ("weekdays 08:00-19:00 UTC: min 3, max 1", "line 1: min 3 is above max 1"),
        ("weekdays 08:00-19:00 UTC: lots", "line 1: expected 'min N', 'max N'"),
        ("weekdays 08:00-19:00 UTC: min 1, min 2", "line 1: min given twice"),
        ("otherwise: max 1\nweekdays 08:00-19:00 UTC: min 2", "line 2: nothing may follow"),
        ("at eight o'clock: min 2", "line 1: expected 'DAYS HH:MM-HH:MM TIME/ZONE"),
    ],
)
def test_a_schedule_that_does_not_parse_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse(text)
    assert str(info.value).startswith(reason), str(info.value)


def test_rules_may_be_separated_by_semicolons() -> None:
    s = parse("weekdays 08:00-19:00 Europe/Berlin: min 2; otherwise: max 1")
    assert [r.text for r in s.rules] == ["weekdays 08:00-19:00 Europe/Berlin: min 2", "otherwise: max 1"]


def test_the_schedule_clock_is_wall_time_unless_simulated() -> None:
    from datetime import timedelta

    from control.autoscale.schedule import ScheduleClock

    wall = datetime(2026, 11, 30, 4, 0, tzinfo=UTC)
    assert ScheduleClock().at(wall) == wall
    day = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    clock = ScheduleClock(start=day, origin=wall, speed=120.0)
    assert clock.at(wall) == day
    assert clock.at(wall + timedelta(minutes=6)) == day + timedelta(hours=12)  # 24 h in 12 min
    # a simulated day crosses a schedule's window at the compressed instant
    schedule = parse("weekdays 07:30-18:30 UTC: min 2")
    before = clock.at(wall + timedelta(seconds=7.4 * 30))  # 07:24 of the simulated Tuesday
    inside = clock.at(wall + timedelta(seconds=7.6 * 30))
    assert schedule.limits(before, 0, 4).min_instances == 0
    assert schedule.limits(inside, 0, 4).min_instances == 2


def test_a_simulated_schedule_clock_needs_an_instant_with_its_offset() -> None:
    from control.autoscale.settings import AutoscalerSettings
    from hpcgate.settings import SettingsError, load_settings

    env = {"HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_START": "2026-12-01T07:00:00+01:00",
           "HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_SPEED": "120"}
    s = load_settings(AutoscalerSettings, "autoscaler", env=env)
    assert s.schedule_clock_start == datetime(2026, 12, 1, 6, 0, tzinfo=UTC) and s.schedule_clock_speed == 120
    naive = {**env, "HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_START": "2026-12-01T07:00:00"}
    with pytest.raises(SettingsError, match=r"SCHEDULE_CLOCK_START.*timezone"):
        load_settings(AutoscalerSettings, "autoscaler", env=naive)
    stopped = {**env, "HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_SPEED": "0"}
    with pytest.raises(SettingsError, match="SCHEDULE_CLOCK_SPEED"):
        load_settings(AutoscalerSettings, "autoscaler", env=stopped)
