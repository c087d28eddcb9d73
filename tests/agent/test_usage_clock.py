"""Usage buckets and the host cache take their time from agent.clock.

The injected clocks return times in 2031, years away from the real date, so a
bucket keyed by the real clock could not match the expected day.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import clock as clock_module
from agent.sections import UsageSource
from agent.usage.catalog import CURRENT_OS
from agent.usage.sampler import HostResolver
from agent.usage.tracker import UsageTracker

# 22:30 UTC is 23:30 in Berlin (UTC+1 in January); 2031-01-08 is a Wednesday.
INJECTED_UTC = datetime(2031, 1, 8, 22, 30, tzinfo=UTC)
BERLIN_DAY = "2031-01-08"
BERLIN_HOUR = 23
WEDNESDAY_23 = 2 * 24 + 23


class SetClock(clock_module.Clock):
    """An agent clock that does not move until the test advances it."""

    def __init__(self, now: datetime) -> None:
        self.wall = now
        self.seconds = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.seconds += seconds


@pytest.fixture
def berlin_local_time() -> Iterator[None]:
    """Make Europe/Berlin the process's local time zone during the test."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available on this platform")
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch, berlin_local_time: None) -> SetClock:
    clock = SetClock(INJECTED_UTC)
    monkeypatch.setattr(clock_module, "clock", clock)
    return clock


def buckets(db_path: Path) -> list[tuple[str, int, str, int]]:
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute(
            "SELECT day, hour, app_id, minutes FROM usage_minutes ORDER BY day, hour"
        ).fetchall()
    connection.close()
    return [(str(d), int(h), str(a), int(m)) for d, h, a, m in rows]


def test_local_now_follows_now(injected: SetClock) -> None:
    local = clock_module.clock.local_now()

    assert local == INJECTED_UTC
    assert local.utcoffset() == timedelta(hours=1)
    assert local.hour == BERLIN_HOUR


def test_tracker_bucket_from_agent_clock(tmp_path: Path, injected: SetClock) -> None:
    db_path = tmp_path / "state" / "usage.db"
    tracker = UsageTracker(db_path)

    tracker.record({"slack"}, minutes=5)

    assert buckets(db_path) == [(BERLIN_DAY, BERLIN_HOUR, "slack", 5)]
    summary = tracker.summary()
    assert summary.window_days == 1
    assert [app.app_id for app in summary.apps] == ["slack"]
    assert summary.apps[0].hours == ((WEDNESDAY_23, 5),)


def test_tracker_follows_moved_clock(tmp_path: Path, injected: SetClock) -> None:
    db_path = tmp_path / "state" / "usage.db"
    tracker = UsageTracker(db_path)
    tracker.record({"slack"}, minutes=10)

    # 23:30 plus 45 minutes is 00:15 on Thursday in Berlin.
    injected.advance(45 * 60)
    tracker.record({"slack"}, minutes=10)

    assert buckets(db_path) == [
        (BERLIN_DAY, BERLIN_HOUR, "slack", 10),
        ("2031-01-09", 0, "slack", 10),
    ]
    assert dict(tracker.summary().apps[0].hours) == {WEDNESDAY_23: 10, 3 * 24: 10}


def test_clock_assigned_after_tracker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, berlin_local_time: None
) -> None:
    db_path = tmp_path / "state" / "usage.db"
    tracker = UsageTracker(db_path)
    # As a test launcher does: the clock is replaced after the agent imported
    # and built its parts.
    monkeypatch.setattr(clock_module, "clock", SetClock(INJECTED_UTC))

    tracker.record({"zoom"}, minutes=3)

    assert buckets(db_path) == [(BERLIN_DAY, BERLIN_HOUR, "zoom", 3)]


def test_usage_source_sample_uses_agent_clock(
    tmp_path: Path, injected: SetClock
) -> None:
    # The catalog lists this test process, so the sample finds it running.
    if CURRENT_OS is None:
        pytest.skip(f"the catalog has no process names for {sys.platform}")
    name = psutil.Process().name()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        f'[apps.test-runner]\nname = "Test runner"\n'
        f"processes.{CURRENT_OS} = [{name!r}]\n",
        encoding="utf-8",
    )
    db_path = tmp_path / "state" / "usage.db"
    source = UsageSource(True, [catalog], db_path, resolve_hosts=False)

    source.sample(minutes=5)

    assert (BERLIN_DAY, BERLIN_HOUR, "test-runner", 5) in buckets(db_path)
    assert {row[0] for row in buckets(db_path)} == {BERLIN_DAY}

    # The section sent to the collector reads the same clock, so the minutes
    # sampled in 2031 fall inside its window.
    section = source.read()
    apps = {app.app_id: app for app in section.apps}
    assert "test-runner" in apps
    usage = apps["test-runner"]
    assert dict(zip(usage.hours_of_week, usage.minutes, strict=True)) == {
        WEDNESDAY_23: 5
    }


class CountingDns:
    """A getaddrinfo for one made-up host that counts its lookups."""

    def __init__(self) -> None:
        self.lookups = 0

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        self.lookups += 1
        return [
            (
                socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                ("127.0.0.9", 0),
            )
        ]


def test_host_cache_expires_on_agent_clock(injected: SetClock) -> None:
    dns = CountingDns()
    resolver = HostResolver(dns, ttl_seconds=3600)

    first = resolver.addresses("sap.example.test")
    injected.advance(3599)
    cached = resolver.addresses("sap.example.test")
    lookups_before_expiry = dns.lookups
    injected.advance(2)
    resolver.addresses("sap.example.test")

    assert first == cached == frozenset({"127.0.0.9"})
    assert lookups_before_expiry == 1
    assert dns.lookups == 2
