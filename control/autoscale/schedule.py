"""Per-model schedules: time windows that change a model's min and max instances. Pure.

A schedule is a few lines, one rule each; the first rule whose window holds the instant wins,
and an ``otherwise`` rule (at most one, last) applies outside every window::

    weekdays 08:00-19:00 Europe/Berlin: min 2
    daily 22:00-06:00 Europe/Berlin: max 0
    otherwise: max 1

Days: ``daily``, ``weekdays``, ``weekends``, or day names and ranges (``mon-fri``,
``sat,sun``, ``mon,wed-fri``). A window ``HH:MM-HH:MM`` is local wall time in the named IANA
time zone (the standard library's ``zoneinfo``: daylight saving time is that zone's), from the
start included to the end excluded; an end at or before the start runs past midnight and
belongs to the day it started on (``fri 22:00-06:00`` holds Saturday 03:00). ``#`` starts a
comment; ``;`` separates rules like a new line (for a one-line command). A rule sets ``min N``,
``max N`` or both; what it leaves out stays the model's own.

Invariants: :func:`parse` either returns a schedule or raises :class:`ScheduleError` whose
message names the line and what is wrong (the admin API answers it as 422); the limits a
schedule gives are clamped into the model's own ``[min, max]`` (a schedule narrows, never
widens), and a ``max`` below the resulting ``min`` lowers the ``min`` to it.

:class:`ScheduleClock` gives the instant a schedule is judged at: wall time, or (for
demonstrations and ``hpcgate bench day``) a simulated clock that reads ``start`` at the wall
instant ``origin`` and runs ``speed`` times faster than wall time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_SETS = {"daily": frozenset(range(7)), "weekdays": frozenset(range(5)), "weekends": frozenset({5, 6})}
_RULE = re.compile(
    r"^(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})\s+(?P<tz>\S+)\s*:"
    r"\s*(?P<limits>.*)$"
)
_OTHERWISE = re.compile(r"^otherwise\s*:\s*(?P<limits>.*)$", re.IGNORECASE)
_LIMIT = re.compile(r"^(min|max)\s+(\d{1,5})$")
MAX_RULES = 32


class ScheduleError(ValueError):
    """A schedule that does not parse; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Rule:
    text: str
    days: frozenset[int] | None  # None: the otherwise rule
    start: time
    end: time
    zone: ZoneInfo | None
    min_instances: int | None
    max_instances: int | None

    def holds(self, at: datetime) -> bool:
        if self.days is None or self.zone is None:
            return True
        local = at.astimezone(self.zone)
        now, day = local.time().replace(tzinfo=None), local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= now < self.end
        # past midnight: the evening part on a listed day, the morning part on the day after one
        return (day in self.days and now >= self.start) or ((day - 1) % 7 in self.days and now < self.end)


@dataclass(frozen=True, slots=True)
class Limits:
    min_instances: int
    max_instances: int
    rule: str | None  # the rule that set them, None when no rule applied


@dataclass(frozen=True, slots=True)
class Schedule:
    rules: tuple[Rule, ...]

    def limits(self, at: datetime, min_instances: int, max_instances: int) -> Limits:
        """The model's limits at instant ``at`` (timezone-aware)."""
        for rule in self.rules:
            if rule.holds(at):
                lo = min_instances if rule.min_instances is None else rule.min_instances
                hi = max_instances if rule.max_instances is None else rule.max_instances
                lo = max(min_instances, min(lo, max_instances))
                hi = max(min_instances, min(hi, max_instances))
                return Limits(min(lo, hi), hi, rule.text)
        return Limits(min_instances, max_instances, None)


def _days(text: str, where: str) -> frozenset[int]:
    if text in _DAY_SETS:
        return _DAY_SETS[text]
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            a = DAY_NAMES.index(first)
            b = DAY_NAMES.index(last) if last else a
        except ValueError:
            raise ScheduleError(
                f"{where}: unknown days {part!r} (daily, weekdays, weekends, or "
                "mon..sun, ranges like mon-fri, lists like sat,sun)"
            ) from None
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(b + 1)])
    return frozenset(days)


def _clock(text: str, where: str) -> time:
    hours, _, minutes = text.partition(":")
    h, m = int(hours), int(minutes)
    if h == 24 and m == 0:
        return time(0, 0)
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ScheduleError(f"{where}: {text!r} is not a time of day (00:00 to 23:59, or 24:00)")
    return time(h, m)


def _limits(text: str, where: str) -> tuple[int | None, int | None]:
    found: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        match = _LIMIT.match(part)
        if not match:
            raise ScheduleError(f"{where}: expected 'min N', 'max N' or both (comma-separated), got {part!r}")
        kind, value = match.group(1), int(match.group(2))
        if kind in found:
            raise ScheduleError(f"{where}: {kind} given twice")
        found[kind] = value
    lo, hi = found.get("min"), found.get("max")
    if lo is not None and hi is not None and lo > hi:
        raise ScheduleError(f"{where}: min {lo} is above max {hi}")
    return lo, hi


def parse(text: str) -> Schedule:
    """The schedule ``text`` describes; an empty text is an empty schedule."""
    rules: list[Rule] = []
    otherwise = False
    for n, raw in enumerate(re.split(r"[\n;]", text), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"line {n}"
        if otherwise:
            raise ScheduleError(f"{where}: nothing may follow the 'otherwise' rule")
        if m := _OTHERWISE.match(line):
            lo, hi = _limits(m.group("limits").strip().lower(), where)
            rules.append(Rule(line, None, time(0), time(0), None, lo, hi))
            otherwise = True
            continue
        m = _RULE.match(line)
        if not m:
            raise ScheduleError(
                f"{where}: expected 'DAYS HH:MM-HH:MM TIME/ZONE: min N, max N' or "
                f"'otherwise: ...', got {raw.strip()!r}"
            )
        try:
            zone = ZoneInfo(m.group("tz"))
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(
                f"{where}: unknown time zone {m.group('tz')!r} (an IANA name such as Europe/Berlin or UTC)"
            ) from None
        start, end = _clock(m.group("start"), where), _clock(m.group("end"), where)
        lo, hi = _limits(m.group("limits").strip().lower(), where)
        rules.append(Rule(line, _days(m.group("days").lower(), where), start, end, zone, lo, hi))
        if len(rules) > MAX_RULES:
            raise ScheduleError(f"at most {MAX_RULES} rules")
    return Schedule(tuple(rules))


@dataclass(frozen=True, slots=True)
class ScheduleClock:
    """Wall time, or a simulated clock: ``start`` at wall instant ``origin``, ``speed`` x faster."""

    start: datetime | None = None
    origin: datetime | None = None
    speed: float = 1.0

    def at(self, wall: datetime) -> datetime:
        """The schedule's instant at wall instant ``wall`` (timezone-aware)."""
        if self.start is None:
            return wall
        origin = self.origin if self.origin is not None else wall
        return self.start + timedelta(seconds=(wall - origin).total_seconds() * self.speed)
