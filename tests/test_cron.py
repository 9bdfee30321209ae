"""Cron schedules as CronJob writes them: the ticks they give, and errors naming the field."""

import re
from datetime import datetime, timezone

import pytest

from kubetune.cron import CronError, parse, zone


def utc(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)


@pytest.mark.parametrize("schedule, after, expected", [
    ("*/15 * * * *", "2026-01-01 10:07", "2026-01-01 10:15"),
    ("*/15 * * * *", "2026-01-01 10:15", "2026-01-01 10:30"),  # strictly after
    ("0 3 * * *", "2026-01-01 03:00", "2026-01-02 03:00"),
    ("@daily", "2026-01-31 23:59", "2026-02-01 00:00"),
    ("@hourly", "2026-01-01 10:59", "2026-01-01 11:00"),
    ("@weekly", "2026-01-01 00:00", "2026-01-04 00:00"),  # 2026-01-01 is a Thursday; Sunday next
    ("@monthly", "2026-01-15 12:00", "2026-02-01 00:00"),
    ("@yearly", "2026-06-01 00:00", "2027-01-01 00:00"),
    ("30 9 * * mon-fri", "2026-01-02 10:00", "2026-01-05 09:30"),  # Friday after 9:30 → Monday
    ("0 0 * * 7", "2026-01-01 00:00", "2026-01-04 00:00"),  # 7 is Sunday too
    ("0 0 13 * fri", "2026-01-01 00:00", "2026-01-02 00:00"),  # both day fields set: either matches
    ("0 0 13 * *", "2026-01-01 00:00", "2026-01-13 00:00"),
    ("0 0 29 feb *", "2026-01-01 00:00", "2028-02-29 00:00"),  # leap day
    ("5/20 1-2 * * *", "2026-01-01 00:00", "2026-01-01 01:05"),  # 5/20: 5, 25, 45
    ("0 12 1,15 * ?", "2026-01-02 00:00", "2026-01-15 12:00"),
])
def test_next_tick(schedule, after, expected):
    assert parse(schedule).next_after(utc(after)) == utc(expected)


def test_latest_tick_at_or_before_counts_the_moment_itself():
    daily = parse("0 3 * * *")
    assert daily.latest_at_or_before(utc("2026-01-02 03:00")) == utc("2026-01-02 03:00")
    assert daily.latest_at_or_before(utc("2026-01-02 02:59")) == utc("2026-01-01 03:00")
    assert parse("0 0 30 2 *").next_after(utc("2026-01-01 00:00")) is None  # never


@pytest.mark.parametrize("schedule, message", [
    ("* * * *", "has 4 fields; a schedule has five"),
    ("60 * * * *", "minute: '60' is outside 0-59"),
    ("0 24 * * *", "hour: '24' is outside 0-23"),
    ("0 0 32 * *", "day of month: '32' is outside 1-31"),
    ("0 0 * 13 *", "month: '13' is outside 1-12"),
    ("0 0 * * 8", "day of week: '8' is outside 0-7"),
    ("*/0 * * * *", "minute: step in '*/0' must be at least 1"),
    ("5-1 * * * *", "minute: range '5-1' ends before it starts"),
    ("0 0 * * someday", "day of week: 'someday' is not a value cron knows"),
    ("@fortnightly", "has 1 fields"),
])
def test_errors_name_the_field(schedule, message):
    with pytest.raises(CronError, match=re.escape(message)):
        parse(schedule)


# In a time zone (a CronJob's timeZone): ticks on the zone's wall clock, given in UTC. Europe/Berlin moves
# to summer time on 2026-03-29 (02:00 → 03:00) and back on 2026-10-25 (03:00 → 02:00).
BERLIN = zone("Europe/Berlin")


@pytest.mark.parametrize("schedule, after, expected", [
    ("0 3 * * *", "2026-01-01 12:00", "2026-01-02 02:00"),  # 03:00 CET is 02:00 UTC
    ("0 3 * * *", "2026-07-01 12:00", "2026-07-02 01:00"),  # 03:00 CEST is 01:00 UTC
    ("30 2 * * *", "2026-03-28 12:00", "2026-03-29 01:30"),  # 02:30 does not exist that day: an hour late
    ("30 2 * * *", "2026-03-29 01:30", "2026-03-30 00:30"),
    ("30 2 * * *", "2026-10-24 12:00", "2026-10-25 00:30"),  # 02:30 comes twice that day: the first
    ("30 2 * * *", "2026-10-25 00:30", "2026-10-26 01:30"),  # and only that one
    ("0 0 * * mon", "2026-01-04 22:00", "2026-01-04 23:00"),  # Monday in Berlin is still Sunday in UTC
])
def test_next_tick_in_a_time_zone(schedule, after, expected):
    assert parse(schedule).next_after(utc(after), BERLIN) == utc(expected)


def test_latest_tick_in_a_time_zone():
    assert parse("30 2 * * *").latest_at_or_before(utc("2026-10-25 01:00"), BERLIN) == utc("2026-10-25 00:30")
    assert parse("0 3 * * *").latest_at_or_before(utc("2026-01-02 01:59"), BERLIN) == utc("2026-01-01 02:00")


def test_an_unknown_time_zone_is_named():
    with pytest.raises(CronError, match="'Mars/Olympus' is not a time zone"):
        zone("Mars/Olympus")
    assert zone(None) == timezone.utc
