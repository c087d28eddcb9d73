"""Reads of the store: devices as fleetmend.v1.Device messages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Connection, RowMapping, func, select

from collector.store._schema import (
    SECTIONS,
    SectionName,
    devices,
    refused_rules,
    reports,
)
from fleetmend.v1 import ops_pb2, remediation_pb2

# Largest number of device ids bound in one IN list; SQLite before 3.32
# accepts at most 999 parameters per statement.
_IN_LIST_SIZE = 900

_SUMMARY_COLUMNS = (
    "device_id",
    "hostname",
    "agent_version",
    "first_seen",
    "last_seen",
    "committed_sequence",
    "last_report_time",
    "dropped_reports",
    "clock_offset_microseconds",
    "clock_skewed",
    "policy_applied_version",
    "policy_rejected_version",
    "policy_rejected_reason",
    "policy_applied_fleet_version",
    "policy_rejected_fleet_version",
    "policy_status_sequence",
)


def list_devices(
    connection: Connection,
    *,
    limit: int,
    after_device_id: str,
    hostname: str,
    full: bool,
) -> list[ops_pb2.Device]:
    """Return a page of devices ordered by device id."""
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    sections: tuple[SectionName, ...] = SECTIONS if full else ("host",)
    query = (
        select(*_columns(sections))
        .where(devices.c.device_id > after_device_id)
        .order_by(devices.c.device_id)
        .limit(limit)
    )
    if hostname:
        query = query.where(devices.c.hostname_key == hostname.casefold())
    records = list(connection.execute(query).mappings())
    refusals = _refused_rules_of(connection, [row["device_id"] for row in records])
    return [
        _device_message(record, sections, refusals.get(record["device_id"], []))
        for record in records
    ]


def get_device(connection: Connection, device_id: str) -> ops_pb2.Device | None:
    """Return one device with every stored section, or None if unknown."""
    query = select(*_columns(SECTIONS)).where(devices.c.device_id == device_id)
    record = connection.execute(query).mappings().first()
    if record is None:
        return None
    refusals = _refused_rules_of(connection, [device_id])
    return _device_message(record, SECTIONS, refusals.get(device_id, []))


def committed_sequence(connection: Connection, device_id: str) -> int:
    """Return the highest stored sequence number of a device, 0 if unknown."""
    query = select(devices.c.committed_sequence).where(devices.c.device_id == device_id)
    return int(connection.execute(query).scalar_one_or_none() or 0)


def revoked_device_ids(connection: Connection, device_ids: Sequence[str]) -> set[str]:
    """Return the ids among device_ids of devices with a revoked_time set."""
    unique_ids = sorted(set(device_ids))
    revoked: set[str] = set()
    for start in range(0, len(unique_ids), _IN_LIST_SIZE):
        chunk = unique_ids[start : start + _IN_LIST_SIZE]
        query = (
            select(devices.c.device_id)
            .where(devices.c.device_id.in_(chunk))
            .where(devices.c.revoked_time.is_not(None))
        )
        revoked.update(connection.execute(query).scalars())
    return revoked


def policy_rejections(connection: Connection, version: int) -> tuple[int, str]:
    """Return how many devices rejected policy version, and one of their reasons.

    Counts devices that are not revoked whose latest policy status has
    rejected_version equal to version. The reason is empty when none did.
    """
    rejected = (
        (devices.c.policy_rejected_version == version)
        & (devices.c.policy_status_sequence != 0)
        & devices.c.revoked_time.is_(None)
    )
    count = connection.execute(
        select(func.count()).select_from(devices).where(rejected)
    ).scalar_one()
    reason = connection.execute(
        select(devices.c.policy_rejected_reason)
        .where(rejected)
        .order_by(devices.c.device_id)
        .limit(1)
    ).scalar_one_or_none()
    return int(count), reason or ""


def rule_refusals(
    connection: Connection, generation: int
) -> dict[str, tuple[int, str]]:
    """Return, per refused rule name, how many devices refuse it and one reason.

    Counts devices that are not revoked whose latest policy status applied
    the effective policy generation, so devices still on an older policy are
    left out. The reason is that of the device with the lowest device id.
    """
    counted = (
        (devices.c.policy_applied_version == generation)
        & (devices.c.policy_status_sequence != 0)
        & devices.c.revoked_time.is_(None)
    )
    rule_name = refused_rules.c.rule_name
    ranked = (
        select(
            rule_name,
            refused_rules.c.reason,
            func.count().over(partition_by=rule_name).label("devices"),
            func.row_number()
            .over(partition_by=rule_name, order_by=refused_rules.c.device_id)
            .label("rank"),
        )
        .join(devices, devices.c.device_id == refused_rules.c.device_id)
        .where(counted)
        .subquery()
    )
    query = select(ranked.c.rule_name, ranked.c.reason, ranked.c.devices).where(
        ranked.c.rank == 1
    )
    return {
        row["rule_name"]: (int(row["devices"]), row["reason"])
        for row in connection.execute(query).mappings()
    }


def refused_rules_of(
    connection: Connection, device_id: str
) -> list[remediation_pb2.RefusedRule]:
    """Return the refused rules of one device's latest policy status, by name."""
    return _refused_rules_of(connection, [device_id]).get(device_id, [])


def _refused_rules_of(
    connection: Connection, device_ids: Sequence[str]
) -> dict[str, list[remediation_pb2.RefusedRule]]:
    """Return the refused rules of each device that has any, by rule name."""
    unique_ids = sorted(set(device_ids))
    refusals: dict[str, list[remediation_pb2.RefusedRule]] = {}
    for start in range(0, len(unique_ids), _IN_LIST_SIZE):
        chunk = unique_ids[start : start + _IN_LIST_SIZE]
        query = select(refused_rules).where(refused_rules.c.device_id.in_(chunk))
        for row in connection.execute(query).mappings():
            refusals.setdefault(row["device_id"], []).append(
                remediation_pb2.RefusedRule(
                    rule_name=row["rule_name"], reason=row["reason"]
                )
            )
    # Sorted here, by code point, because PostgreSQL would sort by the
    # database's locale.
    for rules in refusals.values():
        rules.sort(key=lambda rule: rule.rule_name)
    return refusals


def count_reports(connection: Connection, device_id: str | None) -> int:
    """Return the number of stored reports, of one device or of all."""
    query = select(func.count()).select_from(reports)
    if device_id is not None:
        query = query.where(reports.c.device_id == device_id)
    return int(connection.execute(query).scalar_one())


def _columns(sections: tuple[SectionName, ...]) -> list[Any]:
    names = [*_SUMMARY_COLUMNS, *(f"{name}_pb" for name in sections)]
    return [devices.c[name] for name in names]


def _device_message(
    record: RowMapping,
    sections: tuple[SectionName, ...],
    refusals: Sequence[remediation_pb2.RefusedRule],
) -> ops_pb2.Device:
    device = ops_pb2.Device(
        device_id=record["device_id"],
        hostname=record["hostname"],
        agent_version=record["agent_version"],
        committed_sequence=record["committed_sequence"],
        dropped_reports=record["dropped_reports"],
        clock_skewed=record["clock_skewed"],
    )
    offset_microseconds = record["clock_offset_microseconds"]
    if offset_microseconds is not None:
        offset = timedelta(microseconds=offset_microseconds)
        device.clock_offset.FromTimedelta(offset)
    _set_time(device.first_seen_time, record["first_seen"])
    _set_time(device.last_seen_time, record["last_seen"])
    _set_time(device.last_report_time, record["last_report_time"])
    # A sequence of 0 means that no report carried a policy status yet.
    if record["policy_status_sequence"] != 0:
        device.policy_status.CopyFrom(
            remediation_pb2.PolicyStatus(
                applied_version=record["policy_applied_version"],
                rejected_version=record["policy_rejected_version"],
                rejected_reason=record["policy_rejected_reason"],
                applied_fleet_version=record["policy_applied_fleet_version"],
                rejected_fleet_version=record["policy_rejected_fleet_version"],
                refused_rules=refusals,
            )
        )

    for name in sections:
        payload = record[f"{name}_pb"]
        if payload is None:
            continue
        # SetInParent marks the section present even when it is empty, which
        # means "none any more" rather than "never reported".
        section = getattr(device, name)
        section.SetInParent()
        section.MergeFromString(payload)
    return device


def _set_time(timestamp: Timestamp, value: datetime | None) -> None:
    if value is not None:
        timestamp.FromDatetime(value)
