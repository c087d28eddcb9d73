from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.usage.tracker import AppUsage, UsageHistoryError, UsageTracker

BERLIN = ZoneInfo("Europe/Berlin")
# 2026-05-04 is a Monday.
MONDAY = datetime(2026, 5, 4, 0, 0, tzinfo=BERLIN)
NOBODY_UID = 65534

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX mode bits")


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def hours_of(tracker: UsageTracker, app_id: str) -> dict[int, int]:
    for app in tracker.summary().apps:
        if app.app_id == app_id:
            return dict(app.hours)
    return {}


def row_count(db_path: Path) -> int:
    with sqlite3.connect(db_path) as connection:
        (count,) = connection.execute("SELECT COUNT(*) FROM usage_minutes").fetchone()
    connection.close()
    return int(count)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MONDAY)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "usage.db"


@pytest.fixture
def tracker(db_path: Path, clock: FakeClock) -> UsageTracker:
    return UsageTracker(db_path, clock=clock)


def test_monday_midnight_is_hour_0(tracker: UsageTracker) -> None:
    tracker.record({"slack"})

    assert hours_of(tracker, "slack") == {0: 1}


def test_sunday_2359_is_hour_167(tracker: UsageTracker, clock: FakeClock) -> None:
    clock.now = MONDAY + timedelta(days=6, hours=23, minutes=59)

    tracker.record({"slack"})

    assert hours_of(tracker, "slack") == {167: 1}


def test_monday_2359_and_tuesday_0000(tracker: UsageTracker, clock: FakeClock) -> None:
    clock.now = MONDAY + timedelta(hours=23, minutes=59)
    tracker.record({"slack"})
    clock.now = MONDAY + timedelta(days=1)
    tracker.record({"slack"})

    assert hours_of(tracker, "slack") == {23: 1, 24: 1}


def test_minutes_add_up_in_hour(tracker: UsageTracker, clock: FakeClock) -> None:
    for minute in range(3):
        clock.now = MONDAY + timedelta(hours=9, minutes=minute)
        tracker.record({"slack", "zoom"})

    assert hours_of(tracker, "slack") == {9: 3}
    assert hours_of(tracker, "zoom") == {9: 3}


def test_bucket_capped_at_60(tracker: UsageTracker) -> None:
    tracker.record({"slack"}, minutes=45)
    tracker.record({"slack"}, minutes=45)

    assert hours_of(tracker, "slack") == {0: 60}


def test_same_hour_of_week_summed(tracker: UsageTracker, clock: FakeClock) -> None:
    clock.now = MONDAY + timedelta(hours=9)
    tracker.record({"sap-gui"}, minutes=30)
    clock.now = MONDAY + timedelta(days=7, hours=9)
    tracker.record({"sap-gui"}, minutes=20)

    assert hours_of(tracker, "sap-gui") == {9: 50}


def test_summary_sorted_by_app_and_hour(
    tracker: UsageTracker, clock: FakeClock
) -> None:
    clock.now = MONDAY + timedelta(hours=8)
    tracker.record({"slack"})
    clock.now = MONDAY + timedelta(days=2, hours=15)
    tracker.record({"zoom", "slack"})

    summary = tracker.summary()

    assert [app.app_id for app in summary.apps] == ["slack", "zoom"]
    assert summary.apps[0] == AppUsage("slack", ((8, 1), (63, 1)))


def test_empty_record_adds_nothing(tracker: UsageTracker) -> None:
    tracker.record(set())

    assert tracker.summary().apps == ()


@pytest.mark.parametrize("minutes", [0, -1, 61])
def test_record_rejects_minutes(tracker: UsageTracker, minutes: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 60"):
        tracker.record({"slack"}, minutes=minutes)


def test_repeated_dst_hour_one_bucket(tracker: UsageTracker, clock: FakeClock) -> None:
    # Sunday 2025-10-26, Berlin: 02:00 to 02:59 occurs in CEST and again in CET.
    first_pass = datetime(2025, 10, 26, 2, 30, tzinfo=BERLIN, fold=0)
    second_pass = datetime(2025, 10, 26, 2, 30, tzinfo=BERLIN, fold=1)
    assert first_pass.utcoffset() != second_pass.utcoffset()
    clock.now = first_pass
    tracker.record({"vpn"}, minutes=20)
    clock.now = second_pass
    tracker.record({"vpn"}, minutes=25)

    assert hours_of(tracker, "vpn") == {6 * 24 + 2: 45}


def test_repeated_dst_hour_capped(tracker: UsageTracker, clock: FakeClock) -> None:
    clock.now = datetime(2025, 10, 26, 2, 0, tzinfo=BERLIN, fold=0)
    tracker.record({"vpn"}, minutes=60)
    clock.now = datetime(2025, 10, 26, 2, 0, tzinfo=BERLIN, fold=1)
    tracker.record({"vpn"}, minutes=60)

    assert hours_of(tracker, "vpn") == {6 * 24 + 2: 60}


def test_day_27_still_in_window(tracker: UsageTracker, clock: FakeClock) -> None:
    tracker.record({"slack"})

    summary = tracker.summary(MONDAY + timedelta(days=27, hours=23))

    assert summary.apps == (AppUsage("slack", ((0, 1),)),)


def test_day_28_out_of_window(tracker: UsageTracker, clock: FakeClock) -> None:
    tracker.record({"slack"})

    summary = tracker.summary(MONDAY + timedelta(days=28))

    assert summary.apps == ()


def test_prune_deletes_old_rows(
    tracker: UsageTracker, clock: FakeClock, db_path: Path
) -> None:
    tracker.record({"slack"})
    clock.now = MONDAY + timedelta(days=27)
    tracker.record({"zoom"})
    rows_before = row_count(db_path)
    clock.now = MONDAY + timedelta(days=28)
    tracker.record({"zoom"})

    assert rows_before == 2
    assert row_count(db_path) == 2
    assert [app.app_id for app in tracker.summary().apps] == ["zoom"]


def test_window_days_first_day(tracker: UsageTracker) -> None:
    assert tracker.summary().window_days == 1


def test_window_days_grows(tracker: UsageTracker) -> None:
    summary = tracker.summary(MONDAY + timedelta(days=3))

    assert summary.window_days == 4


def test_window_days_max_28(tracker: UsageTracker) -> None:
    summary = tracker.summary(MONDAY + timedelta(days=40))

    assert summary.window_days == 28


def test_window_days_clock_set_back(tracker: UsageTracker) -> None:
    summary = tracker.summary(MONDAY - timedelta(days=5))

    assert summary.window_days == 1


def test_history_survives_restart(db_path: Path, clock: FakeClock) -> None:
    UsageTracker(db_path, clock=clock).record({"slack"}, minutes=5)
    clock.now = MONDAY + timedelta(days=2)

    restarted = UsageTracker(db_path, clock=clock)
    restarted.record({"slack"}, minutes=7)
    summary = restarted.summary()

    assert summary.apps == (AppUsage("slack", ((0, 5), (48, 7))),)
    assert summary.window_days == 3


def test_corrupt_file_error(db_path: Path, clock: FakeClock) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not an SQLite database, but it is long enough" * 20)

    with pytest.raises(UsageHistoryError) as caught:
        UsageTracker(db_path, clock=clock)

    assert str(db_path) in str(caught.value)
    assert "move the file away" in str(caught.value)


def test_newer_schema_error(db_path: Path, clock: FakeClock) -> None:
    UsageTracker(db_path, clock=clock)
    with sqlite3.connect(db_path) as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()

    with pytest.raises(UsageHistoryError, match="schema version 99"):
        UsageTracker(db_path, clock=clock)


@posix_only
def test_file_mode_0600(tracker: UsageTracker, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


@posix_only
def test_folder_mode_0700(tracker: UsageTracker, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


@posix_only
def test_modes_despite_open_umask(db_path: Path, clock: FakeClock) -> None:
    previous = os.umask(0)
    try:
        UsageTracker(db_path, clock=clock)
    finally:
        os.umask(previous)

    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


@posix_only
def test_existing_file_mode_tightened(db_path: Path, clock: FakeClock) -> None:
    UsageTracker(db_path, clock=clock)
    db_path.chmod(0o644)

    UsageTracker(db_path, clock=clock)

    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


@posix_only
def test_journal_mode_0600(tracker: UsageTracker, db_path: Path) -> None:
    previous = os.umask(0)
    connection = sqlite3.connect(db_path, isolation_level=None)
    try:
        # An open write transaction keeps the rollback journal on disk.
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT INTO usage_minutes VALUES ('2026-05-04', 1, 'slack', 1)"
        )
        journal_mode = stat.S_IMODE(Path(f"{db_path}-journal").stat().st_mode)
        connection.execute("ROLLBACK")
    finally:
        connection.close()
        os.umask(previous)

    assert journal_mode == 0o600


# Reading as another account needs root to switch to it, and a folder chain that
# the other account may traverse, so that only the tracker's own modes deny access.


def run_as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("setpriv"):
        prefix = [
            "setpriv",
            f"--reuid={NOBODY_UID}",
            f"--regid={NOBODY_UID}",
            "--clear-groups",
        ]
    else:
        prefix = ["runuser", "-u", "nobody", "--"]
    return subprocess.run(
        [*prefix, *argv],
        capture_output=True,
        text=True,
        errors="replace",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"},
        check=False,
    )


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """Return a new folder that every account may traverse."""
    if sys.platform == "win32" or os.geteuid() != 0:
        pytest.skip("switching to another account needs root on POSIX")
    if not (shutil.which("setpriv") or shutil.which("runuser")):
        pytest.skip("neither setpriv nor runuser is installed")
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-usage-"))
    folder.chmod(0o755)
    for parent in folder.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            shutil.rmtree(folder)
            pytest.skip(f"{parent} is not traversable by other accounts")
    yield folder
    shutil.rmtree(folder)


def test_file_unreadable_by_other_user(open_folder: Path, clock: FakeClock) -> None:
    db_path = open_folder / "state" / "usage.db"
    UsageTracker(db_path, clock=clock).record({"slack"})
    # Open the folder so that only the file's own mode can deny access.
    db_path.parent.chmod(0o755)

    denied = run_as_nobody(["cat", str(db_path)])
    db_path.chmod(0o644)
    allowed = run_as_nobody(["cat", str(db_path)])

    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr
    assert allowed.returncode == 0, allowed.stderr


def test_folder_closed_to_other_user(open_folder: Path, clock: FakeClock) -> None:
    db_path = open_folder / "state" / "usage.db"
    UsageTracker(db_path, clock=clock).record({"slack"})
    # Open the file so that only the folder's mode can deny access.
    db_path.chmod(0o644)

    listing = run_as_nobody(["ls", str(db_path.parent)])
    reading = run_as_nobody(["cat", str(db_path)])

    assert listing.returncode != 0
    assert "Permission denied" in listing.stderr
    assert reading.returncode != 0
    assert "Permission denied" in reading.stderr
