"""The agent's durable outbox: reports wait in SQLite until the collector acks them.

Every report is committed to ``spool.db`` in the state directory before the
link sends it, and is deleted only when an ack covers it, so an agent that is
killed or loses power sends it again after a restart. The collector stores each
(device, sequence) pair once, which makes the repeats harmless.

Two kinds of records are kept: routine ``report`` records and ``remediation``
records. Over the size cap the oldest routine reports are dropped first. Only
when the remediation records alone exceed the cap are the oldest of them dropped
too, so a flood of records from a faulty or hostile collector cannot fill the
disk. Dropped reports of both kinds are
counted in the file, so the count survives a restart and goes to the collector
in the ``dropped_reports`` field of a later report.

A record that the collector rejects as invalid would fail the same way on every
stream, so the link moves it out of the outbox into a quarantine table of the
same file, with the collector's reason. Nothing sends it again, but it stays
for inspection. The quarantine has its own caps on count and size. Over them,
its oldest records are dropped and counted apart from ``dropped_reports``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from agent import clock as clock_module
from agent.text import count_text
from fleetmend.v1 import report_pb2

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.db"

# Sizes from bench/report_size.py on the development VM: a full report is 350
# bytes and a quiet delta 16 bytes. A delta with a changed battery section is
# estimated at about 150 bytes. A week offline at the default intervals (one
# full report a day, a report every 300 s) is 7 full reports and 2,016 reports
# in all. Even if every one of them carried a battery change, that is
# 7 * 350 + 2,016 * 150 = 304,850 bytes. The default is about 55 times that,
# which leaves room for larger full reports (more disks, a busy usage section)
# and for reconnects, each of which adds a full report. The cap counts report
# bytes; SQLite's row and page overhead comes on top in the file.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

# Reports kept in memory while the disk is full: about 21 hours at the default
# report interval of 300 s. Beyond that the oldest report is dropped.
MAX_UNSPOOLED = 256

ERROR_LOG_INTERVAL_SECONDS = 300.0

# Caps of the quarantine of rejected reports. A rejected report comes from a
# fault in the agent or from validation that differs between agent and
# collector versions, so the newest hundred are enough to find the cause. The
# size fits one report of the maximum message size (4 MiB,
# agent.link.MAX_MESSAGE_BYTES).
QUARANTINE_MAX_RECORDS = 100
QUARANTINE_MAX_BYTES = 4 * 1024 * 1024
# The collector's reason is stored up to this many characters.
QUARANTINE_REASON_MAX_CHARS = 1000

_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26

Kind = Literal["report", "remediation"]
KINDS: tuple[Kind, ...] = ("report", "remediation")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    sequence INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('report', 'remediation')),
    body BLOB NOT NULL,
    size_bytes INTEGER NOT NULL,
    -- dropped_reports carried by this report; counted again if it is dropped.
    carried_dropped INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped_pending', 0);
-- Records that the collector rejected as invalid. Nothing sends them again.
CREATE TABLE IF NOT EXISTS quarantine (
    sequence INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    size_bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    -- UTC, ISO 8601
    quarantine_time TEXT NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('quarantine_dropped', 0);
"""


class SpoolError(Exception):
    """The spool file cannot be opened or created; the message names the path."""


@dataclass(frozen=True)
class SpooledRecord:
    """One record waiting for an ack: a serialized report or remediation record."""

    kind: Kind
    sequence: int
    body: bytes
    carried_dropped: int = 0

    def report(self) -> report_pb2.Report:
        """Parse the body as a Report."""
        return report_pb2.Report.FromString(self.body)


@dataclass(frozen=True)
class SpoolStats:
    """Counts and sizes of the spool's contents, for logs, ``diagnose`` and ``show``."""

    path: Path
    file_bytes: int
    stored_bytes: int
    max_bytes: int
    pending_reports: int
    pending_remediations: int
    # Reports dropped by the cap whose count the collector has not yet acked.
    dropped_reports: int
    # Records that the full disk kept out of the file, held in memory.
    unspooled: int
    # Records that the collector rejected as invalid, kept in the quarantine.
    quarantined: int = 0
    # Quarantined records dropped by the quarantine's caps, oldest first.
    quarantine_dropped: int = 0


@dataclass(frozen=True)
class QuarantinedRecord:
    """A record that the collector rejected, with its reason and when it was moved."""

    kind: Kind
    sequence: int
    reason: str
    quarantine_time: datetime
    body: bytes

    def report(self) -> report_pb2.Report:
        """Parse the body as a Report."""
        return report_pb2.Report.FromString(self.body)


def is_disk_full(error: BaseException) -> bool:
    """Return True for SQLite's SQLITE_FULL and for ENOSPC from the OS."""
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == _SQLITE_FULL:
            return True
        return "database or disk is full" in str(error)
    return isinstance(error, OSError) and error.errno == 28


def _is_corruption(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(error)
    return "not a database" in text or "malformed" in text


class _RateLimitedError:
    """Log an error at once, then at most once per interval with a repeat count."""

    def __init__(self, interval_seconds: float = ERROR_LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval_seconds
        self._last: float | None = None
        self._repeats = 0

    def error(self, message: str, *args: object) -> None:
        now = clock_module.clock.monotonic()
        if self._last is not None and now - self._last < self._interval:
            self._repeats += 1
            return
        if self._repeats:
            message += " (%d more times since the last message)"
            args = (*args, self._repeats)
        log.error(message, *args)
        self._last = now
        self._repeats = 0

    def reset(self) -> None:
        self._last = None
        self._repeats = 0


def _create_private(path: Path) -> None:
    """Create an empty file with mode 0600 unless it exists.

    SQLite creates its -wal and -shm files with the mode of the database file,
    so they are private as well. NOTE: on Windows the mode bits mean little;
    the state folder's ACL is what keeps other users out.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class Spool:
    """An SQLite outbox in WAL mode; every method is thread-safe."""

    def __init__(
        self,
        path: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        quarantine_max_records: int = QUARANTINE_MAX_RECORDS,
        quarantine_max_bytes: int = QUARANTINE_MAX_BYTES,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be 1 or more, got {max_bytes}")
        if quarantine_max_records < 1:
            raise ValueError(
                f"quarantine_max_records must be 1 or more, got "
                f"{quarantine_max_records}"
            )
        if quarantine_max_bytes < 1:
            raise ValueError(
                f"quarantine_max_bytes must be 1 or more, got {quarantine_max_bytes}"
            )
        self.path = path
        self.max_bytes = max_bytes
        self.quarantine_max_records = quarantine_max_records
        self.quarantine_max_bytes = quarantine_max_bytes
        self._lock = threading.RLock()
        self._unspooled: list[SpooledRecord] = []
        self._dropped_unspooled = 0
        self._disk_full_log = _RateLimitedError()
        self._cap_log = _RateLimitedError()
        self._conn = self._open()

    # -- opening and recovery --------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            return self._open_checked()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise SpoolError(f"spool {self.path} cannot be opened: {exc}") from exc
            reason = str(exc)
        except _QuickCheckFailed as exc:
            reason = f"PRAGMA quick_check found: {exc}"
        self._move_aside(reason)
        try:
            return self._open_checked()
        except (sqlite3.DatabaseError, _QuickCheckFailed) as exc:
            raise SpoolError(f"new spool {self.path} cannot be created: {exc}") from exc

    def _open_checked(self) -> sqlite3.Connection:
        _create_private(self.path)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10
        )
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
            if [tuple(row) for row in rows] != [("ok",)]:
                raise _QuickCheckFailed("; ".join(str(row[0]) for row in rows[:5]))
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the link may send the record.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, reason: str) -> None:
        stamp = clock_module.clock.now().strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        os.replace(self.path, target)
        # A stale WAL would be replayed into the new, empty database.
        for suffix in ("-wal", "-shm"):
            companion = self.path.with_name(self.path.name + suffix)
            if companion.exists():
                os.replace(companion, target.with_name(target.name + suffix))
        log.error(
            "spool %s is corrupt (%s); moved it to %s and started an empty spool",
            self.path,
            reason,
            target,
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- writing -----------------------------------------------------------------

    def put(self, report: report_pb2.Report, *, carry_dropped: bool = False) -> None:
        """Commit a routine report; keep it in memory if the disk is full.

        With carry_dropped, the report's dropped_reports field is set to the
        pending dropped count under the spool's lock, so that two threads never
        send one count twice. The count moves from the pending counter into the
        stored report in the same transaction.
        """
        with self._lock:
            if carry_dropped:
                report.dropped_reports = self.dropped_pending()
            body = report.SerializeToString(deterministic=True)
            record = SpooledRecord(
                "report", report.sequence, body, report.dropped_reports
            )
            self._put(record)

    def put_remediation(self, sequence: int, body: bytes) -> None:
        """Commit a serialized report that carries remediation records.

        The size cap drops it only after every routine report, oldest first.
        The link sends it like a routine report and deletes it when an ack
        covers its sequence.
        """
        self._put(SpooledRecord("remediation", sequence, body))

    def _put(self, record: SpooledRecord) -> None:
        with self._lock:
            try:
                self.retry_unspooled()
                if self._unspooled:
                    raise _StillFull
                self._insert(record)
            except (sqlite3.Error, OSError, _StillFull) as exc:
                if not isinstance(exc, _StillFull) and not is_disk_full(exc):
                    raise
                self._keep_in_memory(record, exc)

    def _insert(self, record: SpooledRecord) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO outbox "
                "(sequence, kind, body, size_bytes, carried_dropped) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    record.sequence,
                    record.kind,
                    record.body,
                    len(record.body),
                    record.carried_dropped,
                ),
            )
            self._add_dropped(conn, self._dropped_unspooled - record.carried_dropped)
            self._enforce_cap(conn)
        self._dropped_unspooled = 0

    def _keep_in_memory(self, record: SpooledRecord, error: BaseException) -> None:
        if record.carried_dropped:
            # The count stays pending in the file and goes with a later report.
            report = record.report()
            report.dropped_reports = 0
            record = SpooledRecord(
                record.kind,
                record.sequence,
                report.SerializeToString(deterministic=True),
            )
        self._unspooled.append(record)
        self._unspooled.sort(key=lambda item: item.sequence)
        while len(self._unspooled) > MAX_UNSPOOLED:
            index = next(
                (i for i, item in enumerate(self._unspooled) if item.kind == "report"),
                None,
            )
            if index is None:
                break
            del self._unspooled[index]
            self._dropped_unspooled += 1
        detail = "" if isinstance(error, _StillFull) else f": {error}"
        self._disk_full_log.error(
            "spool %s cannot be written because the disk is full%s; %d records "
            "wait in memory and are written when space returns",
            self.path,
            detail,
            len(self._unspooled),
        )

    def retry_unspooled(self) -> int:
        """Write records held in memory since a full disk; return how many went in.

        Called on every tick of the agent. Errors other than a full disk are
        raised.
        """
        with self._lock:
            written = 0
            while self._unspooled:
                record = self._unspooled[0]
                try:
                    self._insert(record)
                except (sqlite3.Error, OSError) as exc:
                    if not is_disk_full(exc):
                        raise
                    self._disk_full_log.error(
                        "spool %s is still full: %s; %d records wait in memory",
                        self.path,
                        exc,
                        len(self._unspooled),
                    )
                    return written
                del self._unspooled[0]
                written += 1
            if written:
                log.info(
                    "spool %s is writable again; wrote %d records kept in memory",
                    self.path,
                    written,
                )
                self._disk_full_log.reset()
            return written

    def _enforce_cap(self, conn: sqlite3.Connection) -> None:
        (total,) = conn.execute(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM outbox"
        ).fetchone()
        if total <= self.max_bytes:
            return
        dropped: dict[Kind, list[int]] = {"report": [], "remediation": []}
        carried = 0
        for kind in KINDS:
            if total <= self.max_bytes:
                break
            rows = conn.execute(
                "SELECT sequence, size_bytes, carried_dropped FROM outbox "
                "WHERE kind = ? ORDER BY sequence",
                (kind,),
            )
            for sequence, size_bytes, carried_dropped in rows:
                if total <= self.max_bytes:
                    break
                dropped[kind].append(sequence)
                total -= size_bytes
                carried += carried_dropped
        doomed = dropped["report"] + dropped["remediation"]
        conn.executemany(
            "DELETE FROM outbox WHERE sequence = ?", [(s,) for s in doomed]
        )
        self._add_dropped(conn, len(doomed) + carried)
        if dropped["report"]:
            log.warning(
                "spool %s is over its cap of %d bytes; dropped the %d oldest "
                "routine reports (up to report %d)",
                self.path,
                self.max_bytes,
                len(dropped["report"]),
                dropped["report"][-1],
            )
        if dropped["remediation"]:
            self._cap_log.error(
                "spool %s contains more remediation records than its cap of %d "
                "bytes; dropped the %d oldest reports of them (up to report %d)",
                self.path,
                self.max_bytes,
                len(dropped["remediation"]),
                dropped["remediation"][-1],
            )

    @staticmethod
    def _add_dropped(conn: sqlite3.Connection, change: int) -> None:
        if change == 0:
            return
        conn.execute(
            "UPDATE counters SET value = MAX(0, value + ?) "
            "WHERE name = 'dropped_pending'",
            (change,),
        )

    # -- reading and acknowledging ---------------------------------------------

    def pending(
        self, after_sequence: int = 0, limit: int = 64, kind: Kind | None = "report"
    ) -> list[SpooledRecord]:
        """Return up to limit records above after_sequence, oldest first.

        Records held in memory since a full disk are included. kind None
        returns both kinds.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, sequence, body, carried_dropped FROM outbox "
                "WHERE sequence > ? AND (? IS NULL OR kind = ?) "
                "ORDER BY sequence LIMIT ?",
                (after_sequence, kind, kind, limit),
            ).fetchall()
            records = [SpooledRecord(k, s, bytes(b), c) for k, s, b, c in rows]
            records += [
                item
                for item in self._unspooled
                if item.sequence > after_sequence and kind in (None, item.kind)
            ]
            records.sort(key=lambda item: item.sequence)
            return records[:limit]

    def acknowledge(self, committed_sequence: int) -> int:
        """Delete every record up to committed_sequence; return how many went."""
        with self._lock:
            sequences = [
                s
                for (s,) in self._conn.execute(
                    "SELECT sequence FROM outbox WHERE sequence <= ?",
                    (committed_sequence,),
                )
            ]
            sequences += [
                item.sequence
                for item in self._unspooled
                if item.sequence <= committed_sequence
            ]
            return self.remove(sequences)

    def remove(self, sequences: Iterable[int]) -> int:
        """Delete the records with these sequences, as acked; return how many went.

        The dropped_reports count that a removed report carried is done with:
        the collector has it.
        """
        wanted = set(sequences)
        with self._lock:
            before = len(self._unspooled)
            self._unspooled = [s for s in self._unspooled if s.sequence not in wanted]
            removed = before - len(self._unspooled)
            if not wanted:
                return removed
            try:
                with self._transaction() as conn:
                    cursor = conn.executemany(
                        "DELETE FROM outbox WHERE sequence = ?", [(s,) for s in wanted]
                    )
                    removed += cursor.rowcount
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                # The records stay and are sent again; the collector drops repeats.
                self._disk_full_log.error(
                    "spool %s cannot delete %d acknowledged records because the "
                    "disk is full: %s",
                    self.path,
                    len(wanted),
                    exc,
                )
            return removed

    def discard(self, sequence: int) -> bool:
        """Delete a record that can never be sent, counted as dropped; True if found.

        Unlike remove(), which is for acked records, the record and any
        dropped_reports count it carried go into the pending dropped count.
        """
        with self._lock:
            kept = [s for s in self._unspooled if s.sequence != sequence]
            found = len(kept) != len(self._unspooled)
            self._unspooled = kept
            try:
                with self._transaction() as conn:
                    row = conn.execute(
                        "SELECT carried_dropped FROM outbox WHERE sequence = ?",
                        (sequence,),
                    ).fetchone()
                    if row is not None:
                        conn.execute(
                            "DELETE FROM outbox WHERE sequence = ?", (sequence,)
                        )
                        self._add_dropped(conn, 1 + int(row[0]))
                        found = True
                    elif found:
                        self._add_dropped(conn, 1)
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                # The record stays, and the next attempt deletes it.
                self._disk_full_log.error(
                    "spool %s cannot delete report %d because the disk is full: %s",
                    self.path,
                    sequence,
                    exc,
                )
                return False
            return found

    def quarantine(self, sequence: int, reason: str) -> bool:
        """Move a record that the collector rejected into the quarantine.

        Returns True if the record was in the spool (file or memory) and is now
        quarantined. The dropped_reports count that it carried goes back into
        the pending dropped count, so that a later report carries it. Over the
        quarantine's caps its oldest records are dropped and counted in
        quarantine_dropped. On a full disk nothing changes and False is
        returned.
        """
        reason = reason[:QUARANTINE_REASON_MAX_CHARS]
        stamp = clock_module.clock.now().isoformat()
        with self._lock:
            record = self._find(sequence)
            if record is None:
                return False
            try:
                with self._transaction() as conn:
                    conn.execute("DELETE FROM outbox WHERE sequence = ?", (sequence,))
                    conn.execute(
                        "INSERT OR REPLACE INTO quarantine "
                        "(sequence, kind, body, size_bytes, reason, quarantine_time) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            sequence,
                            record.kind,
                            record.body,
                            len(record.body),
                            reason,
                            stamp,
                        ),
                    )
                    self._add_dropped(conn, record.carried_dropped)
                    self._enforce_quarantine_caps(conn)
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                self._disk_full_log.error(
                    "spool %s cannot quarantine report %d because the disk is full: %s",
                    self.path,
                    sequence,
                    exc,
                )
                return False
            self._unspooled = [s for s in self._unspooled if s.sequence != sequence]
            return True

    def _find(self, sequence: int) -> SpooledRecord | None:
        """Return the record with this sequence from the file or memory, or None."""
        row = self._conn.execute(
            "SELECT kind, body, carried_dropped FROM outbox WHERE sequence = ?",
            (sequence,),
        ).fetchone()
        if row is not None:
            return SpooledRecord(row[0], sequence, bytes(row[1]), row[2])
        return next(
            (item for item in self._unspooled if item.sequence == sequence), None
        )

    def _enforce_quarantine_caps(self, conn: sqlite3.Connection) -> None:
        count, total = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM quarantine"
        ).fetchone()
        doomed: list[int] = []
        if count > self.quarantine_max_records or total > self.quarantine_max_bytes:
            rows = conn.execute(
                "SELECT sequence, size_bytes FROM quarantine ORDER BY sequence"
            ).fetchall()
            for sequence, size_bytes in rows:
                over_count = count - len(doomed) > self.quarantine_max_records
                if not over_count and total <= self.quarantine_max_bytes:
                    break
                doomed.append(sequence)
                total -= size_bytes
        if not doomed:
            return
        conn.executemany(
            "DELETE FROM quarantine WHERE sequence = ?", [(s,) for s in doomed]
        )
        conn.execute(
            "UPDATE counters SET value = value + ? WHERE name = 'quarantine_dropped'",
            (len(doomed),),
        )
        log.warning(
            "quarantine of spool %s is over its cap of %d records or %d bytes; "
            "dropped the %d oldest rejected reports (up to report %d)",
            self.path,
            self.quarantine_max_records,
            self.quarantine_max_bytes,
            len(doomed),
            doomed[-1],
        )

    def quarantined(self) -> list[QuarantinedRecord]:
        """Return the quarantined records, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, sequence, reason, quarantine_time, body "
                "FROM quarantine ORDER BY sequence"
            ).fetchall()
        return [
            QuarantinedRecord(k, s, r, datetime.fromisoformat(t), bytes(b))
            for k, s, r, t, b in rows
        ]

    def max_sequence(self) -> int:
        """Return the highest sequence in the spool (file or memory), 0 if empty."""
        with self._lock:
            (highest,) = self._conn.execute(
                "SELECT COALESCE(MAX(sequence), 0) FROM outbox"
            ).fetchone()
            memory = max((item.sequence for item in self._unspooled), default=0)
            return max(int(highest), memory)

    def dropped_pending(self) -> int:
        """Return the dropped reports that no stored report carries yet."""
        with self._lock:
            row = self._conn.execute(
                "SELECT value FROM counters WHERE name = 'dropped_pending'"
            ).fetchone()
            return (int(row[0]) if row else 0) + self._dropped_unspooled

    def stats(self) -> SpoolStats:
        """Return counts and sizes of what the spool holds."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(size_bytes), 0), "
                "COALESCE(SUM(carried_dropped), 0) FROM outbox GROUP BY kind"
            ).fetchall()
            counts = {
                kind: (count, size, carried) for kind, count, size, carried in rows
            }
            reports = counts.get("report", (0, 0, 0))
            remediations = counts.get("remediation", (0, 0, 0))
            memory_reports = sum(1 for s in self._unspooled if s.kind == "report")
            quarantined, quarantine_dropped = _quarantine_counts(self._conn)
            return SpoolStats(
                path=self.path,
                file_bytes=_file_bytes(self.path),
                stored_bytes=reports[1] + remediations[1],
                max_bytes=self.max_bytes,
                pending_reports=reports[0] + memory_reports,
                pending_remediations=remediations[0]
                + len(self._unspooled)
                - memory_reports,
                dropped_reports=self.dropped_pending() + reports[2],
                unspooled=len(self._unspooled),
                quarantined=quarantined,
                quarantine_dropped=quarantine_dropped,
            )


class _QuickCheckFailed(Exception):
    """PRAGMA quick_check returned something other than ok."""


class _StillFull(Exception):
    """Older records are still waiting in memory, so a new one waits behind them."""


def _quarantine_counts(conn: sqlite3.Connection) -> tuple[int, int]:
    """Return the quarantined records and those dropped by the quarantine's caps.

    A spool file from an agent version without a quarantine has neither, so
    both are 0.
    """
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quarantine'"
    ).fetchone()
    if has_table is None:
        return 0, 0
    (count,) = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
    row = conn.execute(
        "SELECT value FROM counters WHERE name = 'quarantine_dropped'"
    ).fetchone()
    return int(count), int(row[0]) if row else 0


def _file_bytes(path: Path) -> int:
    """Return the size of the database file and its WAL, 0 for a missing file."""
    total = 0
    for name in (path.name, path.name + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += path.with_name(name).stat().st_size
    return total


def describe(stats: SpoolStats) -> str:
    """Return one line about the spool for logs and the CLI."""
    line = (
        f"spool {stats.path}: {count_text(stats.file_bytes, 'byte')} on disk, "
        f"{count_text(stats.pending_reports, 'report')} and "
        f"{count_text(stats.pending_remediations, 'remediation record')} waiting, "
        f"{count_text(stats.dropped_reports, 'report')} dropped by the cap of "
        f"{stats.max_bytes} bytes"
    )
    if stats.unspooled:
        line += (
            f", {count_text(stats.unspooled, 'record')} held in memory because the "
            "disk is full"
        )
    if stats.quarantined or stats.quarantine_dropped:
        them = "it" if stats.quarantined == 1 else "them"
        line += (
            f", {count_text(stats.quarantined, 'report')} quarantined because the "
            f"collector rejected {them} as invalid"
        )
        if stats.quarantine_dropped:
            line += f" ({stats.quarantine_dropped} more dropped by the quarantine cap)"
    return line


def read_stats(path: Path, max_bytes: int) -> SpoolStats | None:
    """Read a spool's counts without changing it; None if the file does not exist.

    Safe while an agent runs (WAL readers do not block the writer). Raises
    SpoolError naming the file if it cannot be read or is corrupt.
    """
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SpoolError(f"spool {path} cannot be opened: {exc}") from exc
    try:
        rows = conn.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(size_bytes), 0), "
            "COALESCE(SUM(carried_dropped), 0) FROM outbox GROUP BY kind"
        ).fetchall()
        counter = conn.execute(
            "SELECT value FROM counters WHERE name = 'dropped_pending'"
        ).fetchone()
        quarantined, quarantine_dropped = _quarantine_counts(conn)
    except sqlite3.Error as exc:
        raise SpoolError(
            f"spool {path} cannot be read ({exc}); the agent moves a corrupt "
            "spool aside and starts a new one when it starts"
        ) from exc
    finally:
        conn.close()
    counts = {kind: (count, size, carried) for kind, count, size, carried in rows}
    reports = counts.get("report", (0, 0, 0))
    remediations = counts.get("remediation", (0, 0, 0))
    return SpoolStats(
        path=path,
        file_bytes=_file_bytes(path),
        stored_bytes=reports[1] + remediations[1],
        max_bytes=max_bytes,
        pending_reports=reports[0],
        pending_remediations=remediations[0],
        dropped_reports=(int(counter[0]) if counter else 0) + reports[2],
        unspooled=0,
        quarantined=quarantined,
        quarantine_dropped=quarantine_dropped,
    )
