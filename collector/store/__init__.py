"""Storage of devices, reports, credentials, the audit log and self-healing state.

The store uses SQLAlchemy Core.

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
from collector.store import (
    _audit,
    _devices,
    _healing,
    _ingest,
    _migrations,
    _outages,
    _remediations,
    _trust,
)
from collector.store._audit import AuditEvent
from collector.store._engine import (
    WRITE_OPTION,
    create_store_engine,
    describe_error,
    redact_url,
)
from collector.store._model import (
    RULE_STAGES,
    RULE_STATS_OUTCOMES,
    AuditRecord,
    CommandRecord,
    EnrollResult,
    IncomingReport,
    IngestResult,
    NodeKeyRecord,
    OutageRecord,
    PolicyRecord,
    RemediationPosition,
    RuleStageName,
    RuleStateRecord,
    RuleStats,
    StoredRemediationRecord,
    StoreError,
    TokenNameTakenError,
    TokenRecord,
    UnknownDeviceError,
)
from collector.store._remediations import COMMAND_SUMMARY_RULE, RECURRENCE_WINDOW
from fleetmend.v1 import ops_pb2, remediation_pb2

__all__ = [
    "COMMAND_SUMMARY_RULE",
    "RECURRENCE_WINDOW",
    "RULE_STAGES",
    "RULE_STATS_OUTCOMES",
    "AuditEvent",
    "AuditRecord",
    "CommandRecord",
    "EnrollResult",
    "IncomingReport",
    "IngestResult",
    "NodeKeyRecord",
    "OutageRecord",
    "PolicyRecord",
    "RemediationPosition",
    "RuleStageName",
    "RuleStateRecord",
    "RuleStats",
    "Store",
    "StoreError",
    "StoredRemediationRecord",
    "TokenNameTakenError",
    "TokenRecord",
    "UnknownDeviceError",
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
        2**63 - 1, a naive received time, an invalid collect_time, a
        remediation record with an invalid start_time or duration, or a policy
        status with more than 200 refused rules, an invalid or repeated refused
        rule name, or a NUL character in a refusal reason.

        The remediation records and policy status of each newly stored report
        are stored too (see ingest_with_details).
        """
        return self.ingest_with_details(batch).committed

    def ingest_with_details(self, batch: Sequence[IncomingReport]) -> IngestResult:
        """Commit a batch of reports as ingest does; return what it changed.

        Besides the committed sequence numbers, the result names the rules and
        devices with new remediation records and the commands marked done. Each
        newly stored report adds a row per entry of its remediations, so a
        repeated report adds nothing. A record with a command_id of a command
        for the same device sets that command's done_time to the report's
        received time, unless it is set already. The device's policy status,
        with its refused rules, is replaced by the policy_status of the report
        with the highest sequence number that carries one. Refusal reasons
        longer than 1024 characters are cut, with a marker at the end.
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

    def revoked_device_ids(self, device_ids: Sequence[str]) -> set[str]:
        """Return the ids among device_ids of revoked devices.

        Unknown ids are left out, as are devices enrolled again after their
        revocation.
        """
        with self._read("reading revoked devices") as connection:
            return _devices.revoked_device_ids(connection, device_ids)

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
        *,
        audit: AuditEvent | None = None,
    ) -> None:
        """Store an operator token by its id and the hash of its secret part.

        audit, if given, is appended to the audit log in the same transaction,
        so a failed audit write stores no token. Raises TokenNameTakenError,
        with nothing written, when a token of that name exists, revoked or
        not, and ValueError for an invalid name (see auth.check_token_name) or
        role.
        """
        with self._write(f"creating operator token {name!r}") as connection:
            _trust.create_token(
                connection, name, role, token_id, token_hash, created_by, now
            )
            if audit is not None:
                _audit.append_audit_event(connection, audit)

    def find_token(self, token_id: str) -> TokenRecord | None:
        """Return the operator token with token_id, revoked or not, or None."""
        with self._read("looking up an operator token") as connection:
            return _trust.find_token(connection, token_id)

    def list_tokens(self) -> list[TokenRecord]:
        """Return every operator token, revoked ones included, by name."""
        with self._read("listing operator tokens") as connection:
            return _trust.list_tokens(connection)

    def revoke_token(
        self, name: str, now: datetime, *, audit: AuditEvent | None = None
    ) -> bool | None:
        """Revoke the operator token called name.

        Returns None for an unknown name, False when the token was revoked
        already (its revoke time is kept) and True when this call revoked it.
        audit, if given, is appended to the audit log in the same transaction
        unless the name is unknown, so a failed audit write revokes nothing.
        """
        with self._write(f"revoking operator token {name!r}") as connection:
            revoked = _trust.revoke_token(connection, name, now)
            if revoked is not None and audit is not None:
                _audit.append_audit_event(connection, audit)
            return revoked

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

    def set_policy(
        self, policy: remediation_pb2.Policy, set_by: str, now: datetime
    ) -> int:
        """Store policy as the fleet's next version and return that version.

        The stored copy has its version field set to the new version; policy
        itself is not changed. A rule without a state gets one, "canary" when
        its fleet.canary_percent is 1 to 99 and "active" otherwise. A rule
        that keeps its name and definition keeps its state. A rule whose
        condition, action, limits or dry_run changed is rolled out again, from
        canary if it has a canary set, unless it is paused. States of rules
        that the policy no longer has are deleted. Raises ValueError for two
        rules of one name or a naive now.
        """
        with self._write("storing a policy") as connection:
            return _healing.set_policy(connection, policy, set_by, now)

    def current_policy(self) -> PolicyRecord | None:
        """Return the latest policy version, or None before the first set_policy."""
        with self._read("reading the current policy") as connection:
            return _healing.current_policy(connection)

    def rule_states(self) -> dict[str, RuleStateRecord]:
        """Return the fleet state of every rule of the current policy, by name."""
        with self._read("reading rule states") as connection:
            return _healing.rule_states_by_name(connection)

    def set_rule_state(
        self,
        name: str,
        stage: str,
        reason: str,
        changed_by: str,
        now: datetime,
    ) -> RuleStateRecord | None:
        """Set a rule's stage ("active", "canary" or "paused") and reason.

        Returns the new state, or None for a rule that has no state, which is
        one not in the current policy. Raises ValueError for another stage or a
        naive now.
        """
        with self._write(f"changing the state of rule {name!r}") as connection:
            return _healing.set_rule_state(
                connection, name, stage, reason, changed_by, now
            )

    def rule_statistics(self, since_day_start: datetime) -> dict[str, RuleStats]:
        """Return the runs of every rule that has any, by rule name.

        A run is a record of the rule that succeeded or failed, from any
        device; runs_today counts those that started at or after
        since_day_start. Records of operator commands are left out. Raises
        ValueError for a naive since_day_start.
        """
        with self._read("reading rule statistics") as connection:
            return _remediations.rule_statistics(connection, since_day_start)

    def create_commands(
        self,
        action: remediation_pb2.Action,
        device_ids: Sequence[str],
        expire_time: datetime,
        created_by: str,
        now: datetime,
    ) -> list[CommandRecord]:
        """Store one command per device to run action, by device id.

        Each command gets a uuid4 id, and a device id given twice gets one
        command. Raises UnknownDeviceError, before storing any, when a device id
        is not stored, and ValueError for an empty action, naive times or an
        expire_time not after now.
        """
        with self._write("creating commands") as connection:
            return _healing.create_commands(
                connection, action, device_ids, expire_time, created_by, now
            )

    def pending_commands(self, device_id: str, now: datetime) -> list[CommandRecord]:
        """Return the device's commands not done and not expired at now, oldest first.

        Raises ValueError for a naive now.
        """
        with self._read(f"reading the commands of device {device_id}") as connection:
            return _healing.pending_commands(connection, device_id, now)

    def get_command(self, command_id: str) -> CommandRecord | None:
        """Return the command with command_id, or None if unknown."""
        with self._read("reading a command") as connection:
            return _healing.get_command(connection, command_id)

    def device_policy_status(
        self, device_id: str
    ) -> remediation_pb2.PolicyStatus | None:
        """Return the policy status that the device reported last.

        Returns None for an unknown device and before its first report that
        carries a policy status.
        """
        with self._read(f"reading the policy status of {device_id}") as connection:
            return _healing.device_policy_status(connection, device_id)

    def policy_rejections(self, version: int) -> tuple[int, str]:
        """Return how many devices rejected policy version, and one reason.

        version is an effective policy generation, as agents report it. Revoked
        devices are not counted, and the reason is empty when no device
        rejected the version.
        """
        with self._read(f"counting rejections of policy {version}") as connection:
            return _devices.policy_rejections(connection, version)

    def rule_refusals(self, generation: int) -> dict[str, tuple[int, str]]:
        """Return, per rule name, how many devices refuse the rule, and one reason.

        generation is an effective policy generation, as agents report it.
        Only devices whose latest policy status applied that generation are
        counted, and revoked devices are not. Rules that no such device
        refuses are left out.
        """
        with self._read(f"counting refused rules of policy {generation}") as connection:
            return _devices.rule_refusals(connection, generation)

    def list_remediations(
        self,
        limit: int,
        before: RemediationPosition | None = None,
        device_id: str = "",
        rule: str = "",
        outcome: int = 0,
        since: datetime | None = None,
    ) -> list[StoredRemediationRecord]:
        """Return up to limit remediation records, newest start time first.

        Records are ordered by start time, device id, report sequence number
        and index in the report, all descending. before, if given, is the
        position of the last record of the previous page (its .position), and
        only records after it in that order are returned. device_id, rule and
        outcome, where not empty or 0, keep only matching records; since keeps
        records that started at or after it. The rule "command" selects the
        records of operator commands, which have no rule name. A negative limit
        or a naive since raises ValueError.
        """
        with self._read("listing remediation records") as connection:
            return _remediations.list_remediations(
                connection, limit, before, device_id, rule, outcome, since
            )

    def summarize_remediations(
        self,
        device_id: str = "",
        rule: str = "",
        outcome: int = 0,
        since: datetime | None = None,
    ) -> list[ops_pb2.RuleSummary]:
        """Return a summary per rule of the records that match, ordered by rule.

        The filters are those of list_remediations. Records of operator
        commands are summarized under the rule "command". runs counts records
        that succeeded or failed, and success_rate is succeeded / runs (0
        without runs). skipped counts skips, and a SKIPPED record whose
        repeat_count is above 1 counts as repeat_count skips.
        recurring_devices counts devices on which a run that succeeded was
        followed by another run of the same rule within 7 days, among the
        records that match. It is always 0 for operator commands.
        """
        with self._read("summarizing remediation records") as connection:
            return _remediations.summarize_remediations(
                connection, device_id, rule, outcome, since
            )

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
