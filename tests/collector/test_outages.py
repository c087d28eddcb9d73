"""The matching of outage spans against usage hours of the week."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from collector.outages import (
    covered_hours_of_week,
    uses_app_in_hours,
    usually_uses_app,
)
from fleetmend.v1 import report_pb2

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")

# 2026-05-04 is a Monday, 2026-05-10 a Sunday.
MONDAY = datetime(2026, 5, 4, tzinfo=UTC)


def hour_of_week(day: int, hour: int) -> int:
    return day * 24 + hour


def usage(
    *apps: tuple[str, dict[int, int]], enabled: bool = True
) -> report_pb2.UsageSection:
    section = report_pb2.UsageSection(enabled=enabled, window_days=28)
    for app_id, minutes_by_hour in apps:
        hours = sorted(minutes_by_hour)
        section.apps.append(
            report_pb2.AppUsage(
                app_id=app_id,
                hours_of_week=hours,
                minutes=[minutes_by_hour[hour] for hour in hours],
            )
        )
    return section


@pytest.mark.parametrize(
    ("start", "end", "zone", "expected"),
    [
        # Monday 09:00 to 10:00 UTC: the end is exclusive.
        (MONDAY + timedelta(hours=9), MONDAY + timedelta(hours=10), UTC_ZONE, {9}),
        # One minute into the next hour covers that hour too.
        (
            MONDAY + timedelta(hours=9),
            MONDAY + timedelta(hours=10, minutes=1),
            UTC_ZONE,
            {9, 10},
        ),
        # A span of seconds inside one hour.
        (
            MONDAY + timedelta(hours=9, minutes=59, seconds=30),
            MONDAY + timedelta(hours=9, minutes=59, seconds=31),
            UTC_ZONE,
            {9},
        ),
        # Across midnight, Monday 23:30 to Tuesday 00:30.
        (
            MONDAY + timedelta(hours=23, minutes=30),
            MONDAY + timedelta(hours=24, minutes=30),
            UTC_ZONE,
            {23, 24},
        ),
        # Across the week's end, Sunday 23:30 to Monday 00:30.
        (
            MONDAY + timedelta(days=6, hours=23, minutes=30),
            MONDAY + timedelta(days=7, minutes=30),
            UTC_ZONE,
            {167, 0},
        ),
        # The same instants in Berlin (UTC+2 in May) are 2 hours later.
        (
            MONDAY + timedelta(hours=7),
            MONDAY + timedelta(hours=8),
            BERLIN,
            {9},
        ),
        # Sunday 22:30 UTC is Monday 00:30 in Berlin.
        (
            MONDAY + timedelta(days=6, hours=22, minutes=30),
            MONDAY + timedelta(days=6, hours=23),
            BERLIN,
            {0},
        ),
        # Kolkata is UTC+05:30, so a UTC hour touches two local hours.
        (
            MONDAY + timedelta(hours=4),
            MONDAY + timedelta(hours=5),
            KOLKATA,
            {9, 10},
        ),
        # An empty and a reversed span.
        (MONDAY, MONDAY, UTC_ZONE, set()),
        (MONDAY + timedelta(hours=1), MONDAY, UTC_ZONE, set()),
    ],
)
def test_covered_hours_table(
    start: datetime, end: datetime, zone: ZoneInfo, expected: set[int]
) -> None:
    assert covered_hours_of_week(start, end, zone) == expected


def test_whole_week_covers_all() -> None:
    start = MONDAY + timedelta(hours=13, minutes=17)

    hours = covered_hours_of_week(start, start + timedelta(days=7), BERLIN)

    assert hours == set(range(168))


def test_spring_forward_skips_hour() -> None:
    # Berlin moved from 02:00 CET to 03:00 CEST on Sunday 2026-03-29, at
    # 01:00 UTC. A span from 01:30 CET to 03:30 CEST has no local hour 2.
    start = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    end = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)

    hours = covered_hours_of_week(start, end, BERLIN)

    assert hours == {hour_of_week(6, 1), hour_of_week(6, 3)}


def test_fall_back_repeats_hour() -> None:
    # New York moved from 02:00 EDT back to 01:00 EST on Sunday 2026-11-01, at
    # 06:00 UTC. 05:30 to 06:30 UTC is 01:30 EDT to 01:30 EST: local hour 1 only.
    start = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    end = datetime(2026, 11, 1, 6, 30, tzinfo=UTC)

    hours = covered_hours_of_week(start, end, NEW_YORK)

    assert hours == {hour_of_week(6, 1)}


def test_half_hour_change_in_hour() -> None:
    # Lord Howe Island moves from 02:00 (UTC+10:30) to 02:30 (UTC+11) on
    # Sunday 2026-10-04, at 15:30 UTC on Saturday. A span from 01:45 to 02:45
    # local touches local hours 1 and 2 of Sunday.
    start = datetime(2026, 10, 3, 15, 15, tzinfo=UTC)
    end = datetime(2026, 10, 3, 15, 45, tzinfo=UTC)

    hours = covered_hours_of_week(start, end, LORD_HOWE)

    assert hours == {hour_of_week(6, 1), hour_of_week(6, 2)}


def test_naive_times_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        covered_hours_of_week(datetime(2026, 5, 4), MONDAY, UTC_ZONE)  # noqa: DTZ001


@pytest.mark.parametrize(
    ("section", "app_id", "hours", "expected"),
    [
        (usage(("sap", {9: 30})), "sap", frozenset({9}), True),
        (usage(("sap", {9: 30})), "sap", frozenset({10}), False),
        # A single minute of use counts.
        (usage(("sap", {9: 1, 40: 2})), "sap", frozenset({40}), True),
        # Another application's use does not count.
        (usage(("teams", {9: 60})), "sap", frozenset({9}), False),
        (usage(("teams", {9: 60}), ("sap", {10: 5})), "sap", frozenset({10}), True),
        # Usage collection switched off, and no applications at all.
        (usage(("sap", {9: 30}), enabled=False), "sap", frozenset({9}), False),
        (usage(), "sap", frozenset(range(168)), False),
        (usage(("sap", {9: 30})), "sap", frozenset(), False),
    ],
)
def test_uses_app_table(
    section: report_pb2.UsageSection,
    app_id: str,
    hours: frozenset[int],
    expected: bool,
) -> None:
    assert uses_app_in_hours(section, app_id, hours) is expected


@pytest.mark.parametrize(
    ("minutes_by_hour", "start", "end", "zone", "expected"),
    [
        # SAP used Mondays 09:00 to 09:59 local time.
        (
            {9: 120},
            MONDAY + timedelta(hours=9),
            MONDAY + timedelta(hours=11),
            UTC_ZONE,
            True,
        ),
        (
            {9: 120},
            MONDAY + timedelta(hours=10),
            MONDAY + timedelta(hours=11),
            UTC_ZONE,
            False,
        ),
        # 07:00 UTC is 09:00 in Berlin in May.
        (
            {9: 120},
            MONDAY + timedelta(hours=7),
            MONDAY + timedelta(hours=8),
            BERLIN,
            True,
        ),
        (
            {9: 120},
            MONDAY + timedelta(hours=9),
            MONDAY + timedelta(hours=10),
            BERLIN,
            False,
        ),
        # Sunday night use, and an outage across the week's end.
        (
            {167: 15},
            MONDAY + timedelta(days=6, hours=23, minutes=50),
            MONDAY + timedelta(days=7, hours=1),
            UTC_ZONE,
            True,
        ),
        # A week-long outage touches every hour of use.
        ({100: 3}, MONDAY, MONDAY + timedelta(days=7), BERLIN, True),
    ],
)
def test_usually_uses_table(
    minutes_by_hour: dict[int, int],
    start: datetime,
    end: datetime,
    zone: ZoneInfo,
    expected: bool,
) -> None:
    section = usage(("sap", minutes_by_hour))

    assert usually_uses_app(section, "sap", start, end, zone) is expected
