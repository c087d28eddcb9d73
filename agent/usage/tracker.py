"""The local 28-day history of application usage and its hour-of-week summary.

Minutes are stored per (local date, local hour, app id) in an SQLite file that only
the agent's account can read. A summary sums the last 28 days into the 168 hours of
the week, in the device's local time.

Daylight saving time: a bucket is keyed by the wall-clock date and hour, so the hour
that occurs twice when clocks go back collects the minutes of both passes in one
bucket, capped at 60 minutes like every bucket. The hour that is skipped when clocks
go forward never occurs, so it has no minutes.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from agent import clock as clock_module

logger = logging.getLogger(__name__)

WINDOW_DAYS = 28
HOURS_PER_WEEK = 7 * 24
MINUTES_PER_HOUR = 60

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_minutes (
    day TEXT NOT NULL,          -- local date, YYYY-MM-DD
    hour INTEGER NOT NULL,      -- local hour, 0 to 23
    app_id TEXT NOT NULL,
    minutes INTEGER NOT NULL,   -- 1 to 60
    PRIMARY KEY (day, hour, app_id)
);
CREATE TABLE IF NOT EXISTS history_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class UsageHistoryError(Exception):
    """The usage history file cannot be used, with its path and the cause."""


@dataclass(frozen=True)
class AppUsage:
    """Minutes of use of one app per hour of the week, over the summary's window.

    hours contains (hour_of_week, minutes) pairs sorted by hour, with minutes > 0.
    Hour 0 is Monday 00:00 to 00:59 and hour 167 is Sunday 23:00 to 23:59.
    """

    app_id: str
    hours: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class UsageSummary:
    """Usage per app, summed over the last window_days days (at most 28)."""

    window_days: int
    apps: tuple[AppUsage, ...]


def _local_now() -> datetime:
    # Read at each call, so that a clock assigned to agent.clock.clock later,
    # as test launchers do, moves the buckets too.
    return clock_module.clock.local_now()


class UsageTracker:
    """Records minutes of use per app and local hour, and summarizes them.

    clock returns the device's local time (by default agent.clock's local wall
    time); its wall-clock date and hour pick the bucket. The history survives
    restarts because it lives in the file at db_path.
    """

    def __init__(
        self, db_path: Path, clock: Callable[[], datetime] = _local_now
    ) -> None:
        self._db_path = db_path
        self._clock = clock
        _create_private_file(db_path)
        with self._connect() as connection:
            _initialize(connection, db_path, clock().date())

    def record(self, app_ids: set[str], minutes: int = 1) -> None:
        """Add minutes of use to each app's bucket for the current local hour.

        A bucket never exceeds 60 minutes. Also deletes buckets older than the
        28-day window. Raises ValueError unless 1 <= minutes <= 60.
        """
        if not 1 <= minutes <= MINUTES_PER_HOUR:
            raise ValueError(f"minutes must be between 1 and 60, got {minutes}")
        now = self._clock()
        day = now.date().isoformat()
        rows = [(day, now.hour, app_id, minutes) for app_id in sorted(app_ids)]
        with self._connect() as connection:
            connection.executemany(
                "INSERT INTO usage_minutes (day, hour, app_id, minutes)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (day, hour, app_id) DO UPDATE"
                " SET minutes = MIN(60, minutes + excluded.minutes)",
                rows,
            )
            _prune(connection, now.date())

    def summary(self, now: datetime | None = None) -> UsageSummary:
        """Sum the last 28 local days, today included, into hour-of-week buckets.

        now defaults to the clock. Returns only non-zero hours, apps sorted by id.
        """
        today = (now or self._clock()).date()
        first_day = _window_start(today)
        with self._connect() as connection:
            _prune(connection, today)
            rows = connection.execute(
                "SELECT app_id, day, hour, minutes FROM usage_minutes"
                " WHERE day BETWEEN ? AND ?",
                (first_day.isoformat(), today.isoformat()),
            ).fetchall()
            started = _read_start_day(connection)

        per_app: dict[str, dict[int, int]] = {}
        for app_id, day, hour, minutes in rows:
            hour_of_week = date.fromisoformat(day).weekday() * 24 + hour
            hours = per_app.setdefault(app_id, {})
            hours[hour_of_week] = hours.get(hour_of_week, 0) + minutes
        apps = tuple(
            AppUsage(app_id, tuple(sorted(hours.items())))
            for app_id, hours in sorted(per_app.items())
        )
        return UsageSummary(window_days=_covered_days(started, today), apps=apps)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short connection per call, because writes come once per sample and a
        # connection must not be shared between threads.
        try:
            with (
                closing(sqlite3.connect(self._db_path)) as connection,
                connection,
            ):
                yield connection
        except sqlite3.DatabaseError as exc:
            raise UsageHistoryError(
                f"usage history {self._db_path} cannot be used ({exc}); move the "
                "file away to start a new history"
            ) from exc


def _create_private_file(db_path: Path) -> None:
    """Create the folder (mode 0700) and the file (mode 0600) if they are missing.

    SQLite's Unix VFS creates the rollback journal with the database file's mode.
    """
    folder = db_path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        # mkdir's mode is reduced by the umask; chmod sets it exactly.
        folder.chmod(0o700)
    elif folder.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "folder %s of the usage history is open to other accounts (mode %o)",
            folder,
            stat.S_IMODE(folder.stat().st_mode),
        )
    # NOTE: On Windows the mode bits do not restrict reading; the file takes the
    # ACL of its folder, which the installer restricts.
    fd = os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    db_path.chmod(0o600)


def _initialize(connection: sqlite3.Connection, db_path: Path, today: date) -> None:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > _SCHEMA_VERSION:
        raise UsageHistoryError(
            f"usage history {db_path} has schema version {version}, newer than "
            f"this agent's {_SCHEMA_VERSION}; upgrade the agent or move the file away"
        )
    connection.executescript(_SCHEMA)
    connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
    # The first day of collection bounds window_days, so that a young history is
    # not reported as 28 days of zeros.
    connection.execute(
        "INSERT OR IGNORE INTO history_meta (key, value) VALUES ('start_day', ?)",
        (today.isoformat(),),
    )


def _read_start_day(connection: sqlite3.Connection) -> date | None:
    row = connection.execute(
        "SELECT value FROM history_meta WHERE key = 'start_day'"
    ).fetchone()
    return None if row is None else date.fromisoformat(row[0])


def _window_start(today: date) -> date:
    return today - timedelta(days=WINDOW_DAYS - 1)


def _prune(connection: sqlite3.Connection, today: date) -> None:
    deleted = connection.execute(
        "DELETE FROM usage_minutes WHERE day < ?",
        (_window_start(today).isoformat(),),
    ).rowcount
    if deleted:
        logger.debug("pruned %d usage buckets older than %d days", deleted, WINDOW_DAYS)


def _covered_days(started: date | None, today: date) -> int:
    if started is None:
        return 0
    # A clock set back before the start day still counts today as covered.
    return max(1, min(WINDOW_DAYS, (today - started).days + 1))
