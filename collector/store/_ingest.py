"""Writes of the store: hellos, last-seen times and batches of reports."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from collector.store import _remediations
from collector.store._model import IncomingReport, IngestResult
from collector.store._remediations import RemediationRow
from collector.store._schema import (
    MAX_BIGINT,
    MAX_SEQUENCE,
    SECTIONS,
    SectionName,
    devices,
    refused_rules,
    reports,
)
from fleetmend.v1 import remediation_pb2

_POLICY_STATUS_COLUMNS = [
    "policy_applied_version",
    "policy_rejected_version",
    "policy_rejected_reason",
    "policy_applied_fleet_version",
    "policy_rejected_fleet_version",
    "policy_status_sequence",
]

# Largest number of device ids bound in one IN list; SQLite before 3.32
# accepts at most 999 parameters per statement.
_IN_LIST_SIZE = 900

# Bounds of PolicyStatus.refused_rules. An agent refuses only rules of a policy
# it applied, and it rejects a policy of more than 200 rules. Reasons longer
# than the maximum are cut, with a marker, as the agent cuts them.
MAX_REFUSED_RULES = 200
MAX_REFUSED_REASON_CHARS = 1024
# Rule names, as SetPolicy and the agent accept them.
_RULE_NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")


@dataclass
class _Section:
    sequence: int
    payload: bytes | None


@dataclass
class _DeviceState:
    """A device row as ingest reads and rewrites it."""

    device_id: str
    committed_sequence: int
    last_seen: datetime
    last_report_time: datetime | None
    dropped_reports: int
    clock_skewed: bool
    sections: dict[SectionName, _Section]
    policy_status_sequence: int
    policy_status: remediation_pb2.PolicyStatus | None = None
    refused_rules: tuple[tuple[str, str], ...] = ()
    hostname: str | None = None
    changed: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _ReportRow:
    item: IncomingReport
    sequence: int
    collect_time: datetime | None
    remediations: tuple[RemediationRow, ...] = ()
    # (rule name, reason) of each refused rule of the policy status, checked.
    refused_rules: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, int]:
        return (self.item.device_id, self.sequence)


def record_hello(
    connection: Connection,
    device_id: str,
    agent_version: str,
    seen_time: datetime,
    clock_offset: timedelta | None,
    clock_skewed: bool,
) -> int:
    """Upsert a device's agent version, clock offset and last-seen time.

    Returns the device's committed sequence number.
    """
    _check_device_id(device_id)
    _check_aware(seen_time)
    offset_microseconds = None
    if clock_offset is not None:
        offset_microseconds = clock_offset // timedelta(microseconds=1)
        if abs(offset_microseconds) > MAX_BIGINT:
            raise ValueError(
                f"clock offset {clock_offset} of device {device_id} does not fit "
                "in 64 bits of microseconds"
            )
    insert = _dialect_insert(connection)
    new_row = insert.values(
        device_id=device_id,
        agent_version=agent_version,
        first_seen=seen_time,
        last_seen=seen_time,
        clock_offset_microseconds=offset_microseconds,
        clock_skewed=clock_skewed,
    )
    statement = new_row.on_conflict_do_update(
        index_elements=[devices.c.device_id],
        set_={
            "agent_version": new_row.excluded.agent_version,
            "clock_offset_microseconds": new_row.excluded.clock_offset_microseconds,
            "clock_skewed": new_row.excluded.clock_skewed,
            "last_seen": case(
                (
                    devices.c.last_seen < new_row.excluded.last_seen,
                    new_row.excluded.last_seen,
                ),
                else_=devices.c.last_seen,
            ),
        },
    ).returning(devices.c.committed_sequence)
    return int(connection.execute(statement).scalar_one())


def touch(
    connection: Connection, device_ids: Sequence[str], seen_time: datetime
) -> None:
    """Move the last-seen time of known devices forward to seen_time."""
    _check_aware(seen_time)
    for chunk in _chunks(sorted(set(device_ids))):
        # An UPDATE locks rows in scan order. Locking them in device id order
        # first, as ingest does, rules out deadlocks with ingest on PostgreSQL.
        connection.execute(
            select(devices.c.device_id)
            .where(devices.c.device_id.in_(chunk))
            .order_by(devices.c.device_id)
            .with_for_update()
        )
        connection.execute(
            update(devices)
            .where(devices.c.device_id.in_(chunk))
            .where(devices.c.last_seen < seen_time)
            .values(last_seen=seen_time)
        )


def ingest(connection: Connection, batch: Sequence[IncomingReport]) -> IngestResult:
    """Store a batch of reports, their remediation records and the devices' state.

    The caller commits. Raises ValueError, before writing anything, for a report
    the store cannot represent.
    """
    rows = _unique_rows(batch)
    device_ids = sorted({row.item.device_id for row in rows})
    if not device_ids:
        return IngestResult(committed={})

    _insert_missing_devices(connection, rows)
    states = _lock_devices(connection, device_ids)
    inserted = _insert_reports(connection, rows)
    new_rows = [row for row in rows if row.key in inserted]

    for row in new_rows:
        _apply(states[row.item.device_id], row)
    changed_states = [state for state in states.values() if state.changed]
    _write_devices(connection, changed_states)
    _write_refused_rules(
        connection,
        [state for state in changed_states if "policy_status" in state.changed],
    )

    records = [record for row in new_rows for record in row.remediations]
    _remediations.insert_rows(connection, records)
    done: dict[tuple[str, str], datetime] = {}
    for row in new_rows:
        for record in row.remediations:
            if record.command_id:
                key = (row.item.device_id, record.command_id)
                received = row.item.received_time
                done[key] = min(done.get(key, received), received)
    done_command_ids = _remediations.mark_commands_done(connection, done)

    return IngestResult(
        committed={
            device_id: states[device_id].committed_sequence for device_id in device_ids
        },
        rules=frozenset(record.rule for record in records if record.rule),
        remediation_devices=frozenset(
            row.item.device_id for row in new_rows if row.remediations
        ),
        done_command_ids=frozenset(done_command_ids),
    )


def _unique_rows(batch: Sequence[IncomingReport]) -> list[_ReportRow]:
    """Validate the batch and drop repeats of a (device, sequence) pair in it."""
    rows: dict[tuple[str, int], _ReportRow] = {}
    for item in batch:
        row = _report_row(item)
        rows.setdefault(row.key, row)
    return list(rows.values())


def _report_row(item: IncomingReport) -> _ReportRow:
    _check_device_id(item.device_id)
    sequence = item.report.sequence
    if not 1 <= sequence <= MAX_SEQUENCE:
        raise ValueError(
            f"report of device {item.device_id} has sequence {sequence}; "
            f"sequence numbers run from 1 to {MAX_SEQUENCE}"
        )
    if item.received_time.utcoffset() is None:
        raise ValueError(
            f"report {sequence} of device {item.device_id} has a naive received "
            "time; pass a timezone-aware datetime"
        )

    collect_time = None
    if item.report.HasField("collect_time"):
        try:
            collect_time = item.report.collect_time.ToDatetime(tzinfo=UTC)
        except ValueError as error:
            raise ValueError(
                f"report {sequence} of device {item.device_id} has an invalid "
                f"collect_time: {error}"
            ) from error
    records = _remediations.remediation_rows(
        item.device_id, sequence, item.report, item.received_time
    )
    refused = _refused_rule_rows(
        item.report.policy_status.refused_rules,
        f"report {sequence} of device {item.device_id}",
    )
    return _ReportRow(
        item=item,
        sequence=sequence,
        collect_time=collect_time,
        remediations=records,
        refused_rules=refused,
    )


def _refused_rule_rows(
    rules: Sequence[remediation_pb2.RefusedRule], where: str
) -> tuple[tuple[str, str], ...]:
    """Check PolicyStatus.refused_rules; return (rule name, reason) of each.

    Raises ValueError for more than MAX_REFUSED_RULES entries, an invalid or
    repeated rule name, or a reason with a NUL character.
    """
    if len(rules) > MAX_REFUSED_RULES:
        raise ValueError(
            f"{where} has {len(rules)} refused rules in its policy status, more "
            f"than the maximum of {MAX_REFUSED_RULES}, the most rules in a policy"
        )
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        entry = f"{where} has policy_status.refused_rules[{index}]"
        if not _RULE_NAME_PATTERN.fullmatch(rule.rule_name):
            raise ValueError(
                f"{entry} with the invalid rule_name {rule.rule_name[:80]!r}; "
                "rule names are 1 to 64 of a-z, 0-9, '_' and '-'"
            )
        if rule.rule_name in seen:
            raise ValueError(f"{entry} with rule_name {rule.rule_name!r} repeated")
        seen.add(rule.rule_name)
        # PostgreSQL text columns cannot store NUL characters.
        if "\x00" in rule.reason:
            raise ValueError(f"{entry} with a NUL character in its reason")
        rows.append((rule.rule_name, _cut(rule.reason, MAX_REFUSED_REASON_CHARS)))
    return tuple(rows)


def _cut(text: str, limit: int) -> str:
    """Cut text to at most limit characters, ending with a marker when cut."""
    if len(text) <= limit:
        return text
    marker = f" ... [truncated, {len(text)} characters in all]"
    return text[: limit - len(marker)] + marker


def _check_device_id(device_id: str) -> None:
    if not device_id:
        raise ValueError("device id is empty")


def _check_aware(seen_time: datetime) -> None:
    if seen_time.utcoffset() is None:
        raise ValueError(f"seen time {seen_time} is naive; pass a timezone-aware one")


def _insert_missing_devices(connection: Connection, rows: list[_ReportRow]) -> None:
    first_received: dict[str, datetime] = {}
    for row in rows:
        device_id = row.item.device_id
        received = row.item.received_time
        if device_id not in first_received or received < first_received[device_id]:
            first_received[device_id] = received

    # Sorted rows make concurrent batches lock new device rows in one order,
    # which rules out deadlocks between them on PostgreSQL.
    values = [
        {"device_id": device_id, "first_seen": received, "last_seen": received}
        for device_id, received in sorted(first_received.items())
    ]
    statement = _dialect_insert(connection).on_conflict_do_nothing(
        index_elements=[devices.c.device_id]
    )
    connection.execute(statement, values)


def _lock_devices(
    connection: Connection, device_ids: list[str]
) -> dict[str, _DeviceState]:
    """Read the devices' state, locking their rows until the transaction ends.

    FOR UPDATE applies on PostgreSQL. SQLite renders no lock clause and relies
    on the BEGIN IMMEDIATE write lock that the store takes for every write.
    """
    columns = [
        devices.c.device_id,
        devices.c.committed_sequence,
        devices.c.last_seen,
        devices.c.last_report_time,
        devices.c.dropped_reports,
        devices.c.clock_skewed,
        devices.c.policy_status_sequence,
        *(devices.c[f"{name}_sequence"] for name in SECTIONS),
    ]
    states: dict[str, _DeviceState] = {}
    for chunk in _chunks(device_ids):
        query = (
            select(*columns)
            .where(devices.c.device_id.in_(chunk))
            .order_by(devices.c.device_id)
            .with_for_update()
        )
        for record in connection.execute(query).mappings():
            sections = {
                name: _Section(record[f"{name}_sequence"], None) for name in SECTIONS
            }
            states[record["device_id"]] = _DeviceState(
                device_id=record["device_id"],
                committed_sequence=record["committed_sequence"],
                last_seen=record["last_seen"],
                last_report_time=record["last_report_time"],
                dropped_reports=record["dropped_reports"],
                clock_skewed=record["clock_skewed"],
                sections=sections,
                policy_status_sequence=record["policy_status_sequence"],
            )
    return states


def _insert_reports(
    connection: Connection, rows: list[_ReportRow]
) -> set[tuple[str, int]]:
    """Insert the reports not stored yet and return the keys actually inserted."""
    values = [
        {
            "device_id": row.item.device_id,
            "sequence": row.sequence,
            "received_time": row.item.received_time,
            "collect_time": row.collect_time,
            "is_full": row.item.report.full,
            "payload": row.item.report.SerializeToString(),
            "clock_skewed": row.item.clock_skewed,
        }
        for row in rows
    ]
    statement = (
        _dialect_insert(connection, reports)
        .on_conflict_do_nothing(
            index_elements=[reports.c.device_id, reports.c.sequence]
        )
        .returning(reports.c.device_id, reports.c.sequence)
    )
    result = connection.execute(statement, values)
    return {(device_id, sequence) for device_id, sequence in result}


def _apply(state: _DeviceState, row: _ReportRow) -> None:
    """Merge one newly stored report into the device's state."""
    report = row.item.report
    received = row.item.received_time

    if received > state.last_seen:
        state.last_seen = received
        state.changed.add("last_seen")

    if report.dropped_reports:
        # The total saturates instead of overflowing the signed 64-bit column,
        # whatever uint64 the agent sent.
        total = state.dropped_reports + report.dropped_reports
        state.dropped_reports = min(total, MAX_BIGINT)
        state.changed.add("dropped_reports")

    if row.sequence > state.committed_sequence:
        state.committed_sequence = row.sequence
        trusted_time = None if row.item.clock_skewed else row.collect_time
        state.last_report_time = trusted_time or received
        state.clock_skewed = row.item.clock_skewed
        state.changed.add("committed_sequence")

    if report.HasField("policy_status") and row.sequence > state.policy_status_sequence:
        state.policy_status_sequence = row.sequence
        state.policy_status = report.policy_status
        state.refused_rules = row.refused_rules
        state.changed.add("policy_status")

    for name in SECTIONS:
        section = state.sections[name]
        if report.HasField(name) and row.sequence > section.sequence:
            section.sequence = row.sequence
            section.payload = getattr(report, name).SerializeToString()
            state.changed.add(name)
            if name == "host":
                state.hostname = report.host.hostname


def _write_devices(connection: Connection, states: list[_DeviceState]) -> None:
    """Write the changed columns, one executemany per set of changed sections."""
    groups: dict[tuple[tuple[SectionName, ...], bool], list[dict[str, Any]]] = {}
    for state in states:
        changed_sections = tuple(name for name in SECTIONS if name in state.changed)
        group = (changed_sections, "policy_status" in state.changed)
        groups.setdefault(group, []).append(_device_values(state))

    for (changed_sections, policy_changed), values in groups.items():
        columns = [
            "last_seen",
            "committed_sequence",
            "last_report_time",
            "dropped_reports",
            "clock_skewed",
        ]
        for name in changed_sections:
            columns += [f"{name}_pb", f"{name}_sequence"]
        if "host" in changed_sections:
            columns += ["hostname", "hostname_key"]
        if policy_changed:
            columns += _POLICY_STATUS_COLUMNS

        # Typed parameters, so that UtcDateTime converts the times to UTC.
        assignments = {
            column: bindparam(f"new_{column}", type_=devices.c[column].type)
            for column in columns
        }
        statement = (
            update(devices)
            .where(devices.c.device_id == bindparam("target_device_id"))
            .values(assignments)
        )
        connection.execute(statement, values)


def _write_refused_rules(connection: Connection, states: list[_DeviceState]) -> None:
    """Replace the refused rules of devices whose policy status changed."""
    device_ids = sorted(state.device_id for state in states)
    for chunk in _chunks(device_ids):
        connection.execute(
            delete(refused_rules).where(refused_rules.c.device_id.in_(chunk))
        )
    values = [
        {"device_id": state.device_id, "rule_name": name, "reason": reason}
        for state in states
        for name, reason in state.refused_rules
    ]
    if values:
        connection.execute(insert(refused_rules), values)


def _device_values(state: _DeviceState) -> dict[str, Any]:
    values: dict[str, Any] = {
        "target_device_id": state.device_id,
        "new_last_seen": state.last_seen,
        "new_committed_sequence": state.committed_sequence,
        "new_last_report_time": state.last_report_time,
        "new_dropped_reports": state.dropped_reports,
        "new_clock_skewed": state.clock_skewed,
    }
    for name in SECTIONS:
        if name in state.changed:
            section = state.sections[name]
            values[f"new_{name}_pb"] = section.payload
            values[f"new_{name}_sequence"] = section.sequence
    if "host" in state.changed:
        hostname = state.hostname or ""
        values["new_hostname"] = hostname
        values["new_hostname_key"] = hostname.casefold()
    if state.policy_status is not None:
        status = state.policy_status
        values["new_policy_applied_version"] = min(status.applied_version, MAX_BIGINT)
        values["new_policy_rejected_version"] = min(status.rejected_version, MAX_BIGINT)
        values["new_policy_rejected_reason"] = status.rejected_reason
        values["new_policy_applied_fleet_version"] = min(
            status.applied_fleet_version, MAX_BIGINT
        )
        values["new_policy_rejected_fleet_version"] = min(
            status.rejected_fleet_version, MAX_BIGINT
        )
        values["new_policy_status_sequence"] = state.policy_status_sequence
    return values


def _dialect_insert(
    connection: Connection, table: Any = devices
) -> sqlite.Insert | postgresql.Insert:
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _IN_LIST_SIZE):
        yield items[start : start + _IN_LIST_SIZE]
