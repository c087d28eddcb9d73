"""Storage of devices, reports, credentials and the audit log (SQLAlchemy Core).

The store does not depend on gRPC. It takes and returns fleetmend.v1 messages
and plain values. SQLite (WAL mode) is the default; PostgreSQL is selected by a
``postgresql+psycopg://`` URL. The schema is managed by Alembic migrations.

Times go in and come out timezone-aware and are stored in UTC; a naive datetime
raises ValueError. Database failures raise StoreError, with the URL (password
hidden) in the message and the driver's exception chained.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from types import TracebackType

from google.protobuf.message import DecodeError
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from collector.auth import Role
from collector.store import _audit, _devices, _ingest, _migrations, _outages, _trust
from collector.store._engine import (
    WRITE_OPTION,
    create_store_engine,
    describe_error,
    redact_url,
)
from collector.store._model import (
    AuditRecord,
    EnrollResult,
    IncomingReport,
    NodeKeyRecord,
    OutageRecord,
    StoreError,
    TokenNameTakenError,
    TokenRecord,
)
from fleetmend.v1 import ops_pb2

__all__ = [
    "AuditRecord",
    "EnrollResult",
    "IncomingReport",
    "NodeKeyRecord",
    "OutageRecord",
    "Store",
    "StoreError",
    "TokenNameTakenError",
    "TokenRecord",
]

logger = logging.getLogger(__name__)


class Store:
    """A collector database: devices, their reports and latest state, credentials.

    Every method is thread-safe; the gRPC server calls them from a worker thread.
    Each method runs in its own transaction. Writes on SQLite take the database's
    write lock when they begin (BEGIN IMMEDIATE) and wait up to 30 s for it.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        """Wrap an engine made by create_store_engine; use Store.open() instead."""
        self._engine = engine
        self._url = redact_url(url)

    @classmethod
    def open(cls, url: str) -> Store:
        """Open the database at url; for SQLite, create the file's folder, enable WAL.

        A SQLite URL is ``sqlite:///PATH``, where a relative PATH starts at the
        current folder. A missing folder is created with mode 0700 and a
        missing file with mode 0600. A PostgreSQL URL is
        ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE``, and
        ``postgresql://`` selects psycopg too. The schema is not touched: call
        migrate() next. Raises StoreError for an invalid or unsupported URL and
        for a database that cannot be created or reached.
        """
        engine = create_store_engine(url)
        store = cls(engine, url)
        logger.info("opened store %s", store._url)
        return store

    def migrate(self) -> list[str]:
        """Apply pending Alembic migrations and return the revisions applied.

        Concurrent calls on one database apply each revision once. Raises
        StoreError when the database is at a revision unknown to this version.
        """
        with self._write("migrating the database") as connection:
            return _migrations.upgrade(connection)

    def pending_migrations(self) -> list[str]:
        """Return the revisions not yet applied, oldest first.

        Raises StoreError when the database is at a revision unknown to this
        version.
        """
        with self._read("reading the schema revision") as connection:
            return _migrations.pending_revisions(connection)

    def record_hello(
        self,
        device_id: str,
        agent_version: str,
        seen_time: datetime,
        *,
        clock_offset: timedelta | None = None,
        clock_skewed: bool = False,
    ) -> int:
        """Create the device if new, set its agent version, clock and last-seen time.

        clock_offset is the device's clock minus the collector's, or None when
        the hello did not carry the device's time. It replaces the stored one,
        and so does clock_skewed. Returns the highest sequence number committed
        for the device (0 if none). The last-seen time never moves back: an
        earlier seen_time keeps the stored one. Raises ValueError for a naive
        seen_time or an offset beyond 2**63 - 1 microseconds.
        """
        with self._write(f"recording the hello of device {device_id}") as connection:
            return _ingest.record_hello(
                connection,
                device_id,
                agent_version,
                seen_time,
                clock_offset,
                clock_skewed,
            )

    def touch(self, device_ids: Sequence[str], seen_time: datetime) -> None:
        """Set the last-seen time of devices with an open stream.

        Unknown device ids are ignored, and a last-seen time later than
        seen_time is kept.
        """
        with self._write("updating last-seen times") as connection:
            _ingest.touch(connection, device_ids, seen_time)

    def ingest(self, batch: Sequence[IncomingReport]) -> dict[str, int]:
        """Commit a batch of reports in one transaction.

        A (device, sequence) pair already stored changes nothing. Each section of
        the device's latest state is replaced only by a report with a higher
        sequence number than the one that last set it, so reports may arrive in
        any order. Returns, per device in the batch, the highest sequence number
        now committed for it.

        An unknown device is created. The last-seen time becomes the latest
        received time of the batch's new reports, unless it is later already.
        Each newly stored report adds its dropped_reports to the device's total,
        so a repeated report adds nothing. The report with the highest sequence
        number sets the device's clock_skewed flag and, unless it is flagged,
        its last report time.

        The total stops at 2**63 - 1. Raises ValueError, before anything is
        written, for an empty device id, a sequence number outside 1 to
        2**63 - 1, a naive received time or an invalid collect_time.
        """
        with self._write(f"storing a batch of {len(batch)} reports") as connection:
            return _ingest.ingest(connection, batch)

    def committed_sequence(self, device_id: str) -> int:
        """Return the highest committed sequence number of a device (0 if none)."""
        with self._read(f"reading device {device_id}") as connection:
            return _devices.committed_sequence(connection, device_id)

    def list_devices(
        self,
        *,
        limit: int,
        after_device_id: str = "",
        hostname: str = "",
        full: bool = False,
    ) -> list[ops_pb2.Device]:
        """Return up to limit devices with device_id > after_device_id, by device id.

        hostname filters by exact, case-insensitive hostname. Without full, only
        the summary fields and host are set; with full, every section is set.
        Device ids compare by their bytes (UTF-8) on both databases. A negative
        limit raises ValueError.
        """
        with self._read("listing devices") as connection:
            return _devices.list_devices(
                connection,
                limit=limit,
                after_device_id=after_device_id,
                hostname=hostname,
                full=full,
            )

    def get_device(self, device_id: str) -> ops_pb2.Device | None:
        """Return a device with every stored section, or None if unknown.

        A section that no report has carried yet is absent; one that the latest
        report carrying it sent empty is present and empty.
        """
        with self._read(f"reading device {device_id}") as connection:
            return _devices.get_device(connection, device_id)

    def count_reports(self, device_id: str | None = None) -> int:
        """Return the number of stored reports, of one device or of all."""
        with self._read("counting reports") as connection:
            return _devices.count_reports(connection, device_id)

    def enroll_device(
        self,
        device_id: str,
        hostname: str,
        agent_version: str,
        key_id: str,
        key_hash: str,
        now: datetime,
    ) -> EnrollResult:
        """Bind a new node key to a device; return the device id it is bound to.

        A device is enrolled while it has a node key that is not revoked. If
        device_id is enrolled, a new uuid4 id is used instead, and of two
        concurrent enrollments of one id exactly one keeps it. The device row
        is created if missing (first and last seen now); its hostname and agent
        version are set and its revoked_time is cleared. key_hash is the
        SHA-256 hex digest of the key's secret part. Raises ValueError for an
        empty device id or a naive now.
        """
        with self._write(f"enrolling device {device_id}") as connection:
            return _trust.enroll_device(
                connection, device_id, hostname, agent_version, key_id, key_hash, now
            )

    def find_node_key(self, key_id: str) -> NodeKeyRecord | None:
        """Return the node key with key_id, revoked or not, or None if unknown."""
        with self._read("looking up a node key") as connection:
            return _trust.find_node_key(connection, key_id)

    def revoke_device(self, device_id: str, now: datetime) -> int | None:
        """Revoke every valid node key of a device.

        Returns the number of keys revoked (0 when the device was revoked
        already or never enrolled), or None for an unknown device. The
        device's revoked_time is set to now unless it is set already.
        """
        with self._write(f"revoking device {device_id}") as connection:
            return _trust.revoke_device(connection, device_id, now)

    def create_token(
        self,
        name: str,
        role: Role,
        token_id: str,
        token_hash: str,
        created_by: str,
        now: datetime,
    ) -> None:
        """Store an operator token by its id and the hash of its secret part.

        Raises TokenNameTakenError when a token of that name exists, revoked
        or not, and ValueError for an invalid name (see auth.check_token_name)
        or role.
        """
        with self._write(f"creating operator token {name!r}") as connection:
            _trust.create_token(
                connection, name, role, token_id, token_hash, created_by, now
            )

    def find_token(self, token_id: str) -> TokenRecord | None:
        """Return the operator token with token_id, revoked or not, or None."""
        with self._read("looking up an operator token") as connection:
            return _trust.find_token(connection, token_id)

    def list_tokens(self) -> list[TokenRecord]:
        """Return every operator token, revoked ones included, by name."""
        with self._read("listing operator tokens") as connection:
            return _trust.list_tokens(connection)

    def revoke_token(self, name: str, now: datetime) -> bool | None:
        """Revoke the operator token called name.

        Returns None for an unknown name, False when the token was revoked
        already (its revoke time is kept) and True when this call revoked it.
        """
        with self._write(f"revoking operator token {name!r}") as connection:
            return _trust.revoke_token(connection, name, now)

    def mark_token_used(self, token_id: str, now: datetime) -> None:
        """Set the token's last-use time to now, unless it is later already."""
        with self._write("recording the use of an operator token") as connection:
            _trust.mark_token_used(connection, token_id, now)

    def append_audit(
        self,
        event_time: datetime,
        actor: str,
        role: Role | None,
        action: str,
        arguments_json: str,
        outcome: str,
        peer: str,
    ) -> int:
        """Append an event to the audit log and return its event id.

        Event ids increase with each append. role is None for a call that
        carried no valid token.
        """
        with self._write(f"writing an audit event for {action}") as connection:
            return _audit.append_audit(
                connection,
                event_time,
                actor,
                role,
                action,
                arguments_json,
                outcome,
                peer,
            )

    def list_audit(
        self, limit: int, before_event_id: int | None = None, actor: str = ""
    ) -> list[AuditRecord]:
        """Return up to limit audit events, newest (highest event id) first.

        before_event_id, if given, keeps events with a lower id, for paging;
        actor, if not empty, keeps only that actor's events. A negative limit
        raises ValueError.
        """
        with self._read("listing audit events") as connection:
            return _audit.list_audit(connection, limit, before_event_id, actor)

    def add_outage(
        self,
        app_id: str,
        start_time: datetime,
        end_time: datetime,
        time_zone: str,
        message: str,
        declared_by: str,
        declare_time: datetime,
        affected_device_ids: Sequence[str],
    ) -> OutageRecord:
        """Store a declared outage and return it with its new outage id.

        The affected device ids are stored sorted and without repeats. Raises
        ValueError for an empty app id, naive times or an end not after the
        start.
        """
        with self._write(f"declaring an outage of {app_id!r}") as connection:
            return _outages.add_outage(
                connection,
                app_id,
                start_time,
                end_time,
                time_zone,
                message,
                declared_by,
                declare_time,
                affected_device_ids,
            )

    def list_outages(self, end_after: datetime) -> list[OutageRecord]:
        """Return the outages that end after end_after, latest start first."""
        with self._read("listing outages") as connection:
            return _outages.list_outages(connection, end_after)

    def close(self) -> None:
        """Dispose of the engine and its connections."""
        self._engine.dispose()
        logger.info("closed store %s", self._url)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _read(self, action: str) -> Iterator[Connection]:
        with (
            self._translate_errors(action),
            self._engine.connect() as connection,
            connection.begin(),
        ):
            yield connection

    @contextmanager
    def _write(self, action: str) -> Iterator[Connection]:
        with self._translate_errors(action), self._engine.connect() as connection:
            connection.execution_options(**{WRITE_OPTION: True})
            with connection.begin():
                yield connection

    @contextmanager
    def _translate_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, sqlite3.Error, DecodeError) as error:
            raise StoreError(
                f"{action} failed on {self._url}: {describe_error(error)}"
            ) from error
