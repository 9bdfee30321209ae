"""Cron schedules as a CronJob writes them: five fields (minute hour day-of-month month day-of-week), read in
UTC or, like a CronJob's ``timeZone``, in an IANA time zone (``Europe/Berlin``).

The same syntax Kubernetes' CronJob accepts (robfig/cron's standard parser): ``*``, ``?``, lists
(``1,15``), ranges (``1-5``), steps (``*/15``, ``10-50/20``, ``5/10`` = 5-59/10), month and weekday names
(``jan``, ``mon-fri``), 7 as Sunday, and the macros ``@hourly``, ``@daily`` (``@midnight``), ``@weekly``,
``@monthly``, ``@yearly`` (``@annually``). As in Vixie cron, when both day fields are restricted a day
matching either one counts. In a zone with daylight saving time, a tick in the skipped hour comes an hour
late (02:30 is 03:30 that day) and one in the repeated hour comes once, at its first occurrence. Written here
rather than taken from PyPI: it is this small.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# (name, lowest, highest, names for lowest..)
FIELDS = (("minute", 0, 59, []), ("hour", 0, 23, []), ("day of month", 1, 31, []), ("month", 1, 12, MONTHS),
          ("day of week", 0, 7, DAYS))
SEARCH_DAYS = 5 * 366 + 1  # robfig/cron gives up after five years too ("0 0 30 2 *" never comes)


class CronError(ValueError):
    """A schedule that does not parse; the message names the field and the value."""


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is * or ?
    any_weekday: bool

    def day_matches(self, d: datetime) -> bool:
        if d.month not in self.months:
            return False
        dom, dow = d.day in self.days, (d.weekday() + 1) % 7 in self.weekdays
        return (dom and dow) if self.any_day or self.any_weekday else (dom or dow)

    def next_after(self, t: datetime, zone: tzinfo = timezone.utc) -> datetime | None:
        """The first tick strictly after ``t`` (aware), read in ``zone``; in UTC (None: none within five years)."""
        return self._search(t + timedelta(minutes=1), zone, 1)

    def latest_at_or_before(self, t: datetime, zone: tzinfo = timezone.utc) -> datetime | None:
        """The last tick at or before ``t`` (aware), read in ``zone``; in UTC."""
        return self._search(t, zone, -1)

    def _search(self, t: datetime, zone: tzinfo, direction: int) -> datetime | None:
        start = t.astimezone(timezone.utc).replace(second=0, microsecond=0)
        # Wall-clock days in the zone; each tick compared as an instant (a zone's offset changes within a day).
        day = start.astimezone(zone).replace(tzinfo=None, hour=0, minute=0)
        hours, minutes = sorted(self.hours, reverse=direction < 0), sorted(self.minutes, reverse=direction < 0)
        for _ in range(SEARCH_DAYS):
            if self.day_matches(day):
                for hour in hours:
                    for minute in minutes:
                        # fold=0: a skipped time reads with the old offset (an hour late), a repeated one once
                        tick = day.replace(hour=hour, minute=minute, tzinfo=zone, fold=0).astimezone(timezone.utc)
                        if (tick - start) * direction >= timedelta(0):
                            return tick
            day += timedelta(days=direction)
        return None


def zone(name: str | None) -> tzinfo:
    """An IANA time zone by name (None: UTC); CronError when there is no such zone."""
    if name is None:
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CronError(f"'{name}' is not a time zone this machine knows (an IANA name such as Europe/Berlin "
                        "or America/New_York)") from None


def parse(text: str) -> Cron:
    """Parse a schedule; CronError names what is wrong."""
    expr = MACROS.get(text.strip().lower(), text)
    parts = expr.split()
    if len(parts) != 5:
        raise CronError(f"'{text}' has {len(parts)} fields; a schedule has five (minute hour day-of-month month "
                        "day-of-week), e.g. '0 3 * * *', or is a macro such as @daily")
    sets = [_field(part, *spec) for part, spec in zip(parts, FIELDS)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return Cron(*map(frozenset, sets[:4]), weekdays, parts[2][0] in "*?", parts[4][0] in "*?")


def _field(text: str, name: str, lo: int, hi: int, names: list[str]) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = _number(step_text, name, part) if slash else 1
        if step < 1:
            raise CronError(f"{name}: step in '{part}' must be at least 1")
        if base in ("*", "?"):
            first, last = lo, hi
        elif "-" in base:
            first, last = (_value(v, name, lo, names) for v in base.split("-", 1))
        else:
            first = _value(base, name, lo, names)
            last = hi if slash else first
        if not lo <= first <= last <= hi:
            raise CronError(f"{name}: '{part}' is outside {lo}-{hi}" if first <= last
                            else f"{name}: range '{part}' ends before it starts")
        values.update(range(first, last + 1, step))
    return values


def _value(text: str, name: str, lo: int, names: list[str]) -> int:
    if text.lower() in names:
        return names.index(text.lower()) + lo
    return _number(text, name, text)


def _number(text: str, name: str, part: str) -> int:
    if not text.isdigit():
        raise CronError(f"{name}: '{part}' is not a value cron knows (a number, a name such as mon or jan, *, "
                        "a range a-b or a step */n)")
    return int(text)
