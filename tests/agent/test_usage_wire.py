from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from agent.usage.tracker import AppUsage, UsageSummary, UsageTracker
from agent.wire.usage import usage_to_proto
from fleetmend.v1 import report_pb2

SUMMARY = UsageSummary(
    window_days=12,
    apps=(
        AppUsage("sap-gui", ((9, 40), (10, 60), (33, 5))),
        AppUsage("workday", ((167, 2),)),
    ),
)


def test_disabled_section_empty() -> None:
    section = usage_to_proto(SUMMARY, enabled=False)

    assert section.enabled is False
    assert len(section.apps) == 0
    assert section.window_days == 0


def test_disabled_without_summary() -> None:
    section = usage_to_proto(None, enabled=False)

    assert section == report_pb2.UsageSection(enabled=False)


def test_enabled_without_summary() -> None:
    section = usage_to_proto(None, enabled=True)

    assert section.enabled is True
    assert len(section.apps) == 0


def test_enabled_section_apps() -> None:
    section = usage_to_proto(SUMMARY, enabled=True)

    assert section.enabled is True
    assert section.window_days == 12
    assert [app.app_id for app in section.apps] == ["sap-gui", "workday"]
    assert list(section.apps[0].hours_of_week) == [9, 10, 33]
    assert list(section.apps[0].minutes) == [40, 60, 5]
    assert list(section.apps[1].hours_of_week) == [167]
    assert list(section.apps[1].minutes) == [2]


def test_parallel_arrays_same_length() -> None:
    section = usage_to_proto(SUMMARY, enabled=True)

    for app in section.apps:
        assert len(app.hours_of_week) == len(app.minutes), app.app_id


def test_unsorted_hours_sorted() -> None:
    summary = UsageSummary(5, (AppUsage("slack", ((50, 1), (3, 7), (20, 2))),))

    app = usage_to_proto(summary, enabled=True).apps[0]

    assert list(app.hours_of_week) == [3, 20, 50]
    assert list(app.minutes) == [7, 2, 1]


def test_zero_minutes_dropped() -> None:
    summary = UsageSummary(
        5, (AppUsage("slack", ((1, 0), (2, 4))), AppUsage("z", ((3, 0),)))
    )

    section = usage_to_proto(summary, enabled=True)

    assert [app.app_id for app in section.apps] == ["slack"]
    assert list(section.apps[0].hours_of_week) == [2]


def test_window_days_capped_at_28() -> None:
    section = usage_to_proto(UsageSummary(40, ()), enabled=True)

    assert section.window_days == 28


def test_section_round_trips() -> None:
    section = usage_to_proto(SUMMARY, enabled=True)

    parsed = report_pb2.UsageSection.FromString(section.SerializeToString())

    assert parsed == section


def test_tracker_summary_to_proto(tmp_path: Path) -> None:
    # 2026-05-10 is a Sunday.
    now = datetime(2026, 5, 10, 23, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    tracker = UsageTracker(tmp_path / "usage.db", clock=lambda: now)
    tracker.record({"workday"}, minutes=3)

    section = usage_to_proto(tracker.summary(now + timedelta(minutes=1)), True)

    assert section.window_days == 1
    assert section.apps[0].app_id == "workday"
    assert list(section.apps[0].hours_of_week) == [167]
    assert list(section.apps[0].minutes) == [3]
