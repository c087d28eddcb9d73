"""Tables of the store, as SQLAlchemy Core metadata.

The migrations in collector/migrations/versions create the same tables; a change
here needs a new migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

# Report sections in field order of fleetmend.v1.Report. Each one has a
# "<name>_pb" column (serialized message, NULL until a report sets it) and a
# "<name>_sequence" column (sequence number of the report that set it, 0 before).
SectionName = Literal["host", "disks", "batteries", "credentials", "usage"]
SECTIONS: tuple[SectionName, ...] = (
    "host",
    "disks",
    "batteries",
    "credentials",
    "usage",
)

# Explicit constraint names, so that both dialects and later migrations agree.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Largest value of a BigInteger column, which is signed 64-bit on both
# databases.
MAX_BIGINT = 2**63 - 1
# Signed 64-bit columns hold the uint64 sequence numbers, so larger ones are
# rejected before they reach the database.
MAX_SEQUENCE = MAX_BIGINT


def device_id_type() -> TypeEngine[str]:
    """Return the column type of device ids.

    PostgreSQL compares them with the "C" collation, so that ordering and paging
    follow byte order as on SQLite, whatever the database's default locale is.
    """
    return String().with_variant(String(collation="C"), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime, stored in UTC.

    PostgreSQL stores it as timestamptz. SQLite has no time zones, so the value
    is stored as naive UTC text and read back with tzinfo=UTC. Naive datetimes
    are rejected with ValueError.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
        utc_value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return utc_value.replace(tzinfo=None)
        return utc_value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _section_columns() -> list[Column[Any]]:
    columns: list[Column[Any]] = []
    for name in SECTIONS:
        columns.append(Column(f"{name}_pb", LargeBinary, nullable=True))
        columns.append(
            Column(f"{name}_sequence", BigInteger, nullable=False, server_default="0")
        )
    return columns


# One row per device: its identity, timestamps and latest state per section.
devices = Table(
    "devices",
    metadata,
    Column("device_id", device_id_type(), primary_key=True),
    Column("hostname", String, nullable=False, server_default=""),
    # hostname.casefold(), for case-insensitive lookups that do not depend on
    # the database's own lower() and its locale.
    Column("hostname_key", String, nullable=False, server_default="", index=True),
    Column("agent_version", String, nullable=False, server_default=""),
    Column("first_seen", UtcDateTime, nullable=False),
    Column("last_seen", UtcDateTime, nullable=False),
    Column("committed_sequence", BigInteger, nullable=False, server_default="0"),
    # collect_time of the report with the highest sequence number, or its
    # received time when that report carries no collect_time or is flagged as
    # clock-skewed.
    Column("last_report_time", UtcDateTime, nullable=True),
    *_section_columns(),
    # Sum of Report.dropped_reports over the device's stored reports.
    Column("dropped_reports", BigInteger, nullable=False, server_default="0"),
    # The device's clock minus the collector's at the latest hello that carried
    # a send time, in microseconds; NULL when the latest hello carried none.
    Column("clock_offset_microseconds", BigInteger, nullable=True),
    # Whether the device's clock was off at its latest hello or at the report
    # that last raised committed_sequence, whichever came later.
    Column("clock_skewed", Boolean, nullable=False, server_default=false()),
    # When the device was last revoked; NULL while it may enroll and connect.
    # Enrolling the device again clears it.
    Column("revoked_time", UtcDateTime, nullable=True),
    # The agent's latest PolicyStatus: the policy version it runs (0 for its
    # built-in default) and the latest version it rejected, with the reason.
    Column("policy_applied_version", BigInteger, nullable=False, server_default="0"),
    Column("policy_rejected_version", BigInteger, nullable=False, server_default="0"),
    Column("policy_rejected_reason", Text, nullable=False, server_default=""),
    # PolicyStatus.applied_fleet_version and rejected_fleet_version: the
    # operator-visible numbers of those two policies, 0 when not reported.
    Column(
        "policy_applied_fleet_version", BigInteger, nullable=False, server_default="0"
    ),
    Column(
        "policy_rejected_fleet_version", BigInteger, nullable=False, server_default="0"
    ),
    # Sequence number of the report that set the policy status, 0 before.
    Column("policy_status_sequence", BigInteger, nullable=False, server_default="0"),
)


# The refused_rules of each device's latest PolicyStatus, one row per rule:
# rules of the applied policy that the device does not run because they name
# a service or cache set outside its allowlist. Ingest replaces a device's
# rows whenever it replaces the device's policy status.
refused_rules = Table(
    "refused_rules",
    metadata,
    Column(
        "device_id",
        device_id_type(),
        ForeignKey("devices.device_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("rule_name", String, primary_key=True),
    Column("reason", Text, nullable=False),
)

# One row per stored report, with the serialized fleetmend.v1.Report.
reports = Table(
    "reports",
    metadata,
    Column(
        "device_id",
        device_id_type(),
        ForeignKey("devices.device_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("received_time", UtcDateTime, nullable=False),
    Column("collect_time", UtcDateTime, nullable=True),
    Column("is_full", Boolean, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    # True when the collect_time is not to be trusted: the device's clock was
    # off, or the report was stamped in the future or too far in the past.
    # Readers then go by received_time.
    Column("clock_skewed", Boolean, nullable=False, server_default=false()),
)


def serial_id_type() -> TypeEngine[int]:
    """Return the column type of autoincrement ids: 64-bit, INTEGER on SQLite.

    SQLite assigns ids only to an INTEGER PRIMARY KEY column (the rowid), which
    is 64-bit there anyway.
    """
    return BigInteger().with_variant(Integer(), "sqlite")


# Node keys issued at enrollment. key_hash is the SHA-256 hex digest of the
# key's secret part; the key itself is never stored.
node_keys = Table(
    "node_keys",
    metadata,
    Column("key_id", String, primary_key=True),
    Column(
        "device_id",
        device_id_type(),
        ForeignKey("devices.device_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("key_hash", String, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("revoke_time", UtcDateTime, nullable=True),
)

# Operator tokens. A revoked token keeps its row, and with it its name.
operator_tokens = Table(
    "operator_tokens",
    metadata,
    Column("token_id", String, primary_key=True),
    Column("name", String, nullable=False, unique=True),
    # A collector.auth.Role value.
    Column("role", Integer, nullable=False),
    Column("token_hash", String, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("created_by", String, nullable=False),
    Column("revoke_time", UtcDateTime, nullable=True),
    Column("last_use_time", UtcDateTime, nullable=True),
)

# The audit log: every operator action and every refused call, append-only.
audit_events = Table(
    "audit_events",
    metadata,
    Column("event_id", serial_id_type(), primary_key=True, autoincrement=True),
    Column("event_time", UtcDateTime, nullable=False),
    Column("actor", String, nullable=False, index=True),
    # A collector.auth.Role value; NULL when the call carried no valid token.
    Column("role", Integer, nullable=True),
    Column("action", String, nullable=False),
    Column("arguments_json", Text, nullable=False),
    Column("outcome", String, nullable=False),
    Column("peer", String, nullable=False),
)

# Declared outages of applications.
outages = Table(
    "outages",
    metadata,
    Column("outage_id", serial_id_type(), primary_key=True, autoincrement=True),
    Column("app_id", String, nullable=False),
    Column("start_time", UtcDateTime, nullable=False),
    Column("end_time", UtcDateTime, nullable=False, index=True),
    Column("time_zone", String, nullable=False),
    Column("message", Text, nullable=False),
    Column("declared_by", String, nullable=False),
    Column("declare_time", UtcDateTime, nullable=False),
    # JSON array of device ids, sorted.
    Column("affected_device_ids", Text, nullable=False),
)

# Self-healing policies as operators set them, one row per version. policy_pb is
# a serialized fleetmend.v1.Policy whose version field equals the row's.
policies = Table(
    "policies",
    metadata,
    Column("version", serial_id_type(), primary_key=True, autoincrement=True),
    Column("policy_pb", LargeBinary, nullable=False),
    Column("set_by", String, nullable=False),
    Column("set_time", UtcDateTime, nullable=False),
)

# Fleet state of each rule of the current policy.
rule_states = Table(
    "rule_states",
    metadata,
    Column("name", String, primary_key=True),
    # "active", "canary" or "paused".
    Column("stage", String, nullable=False),
    Column("reason", Text, nullable=False),
    Column("changed_time", UtcDateTime, nullable=False),
    # Operator name, or "fleet" for a change made by the fleet limits.
    Column("changed_by", String, nullable=False),
    # When the rule's present definition (condition, action, limits, dry_run)
    # was set; only its runs since then count for the fleet limits. NULL for
    # rules stored before this column, whose runs all count.
    Column("rollout_time", UtcDateTime, nullable=True),
)

# Operator commands, one row per device; action_pb is a serialized
# fleetmend.v1.Action. done_time is set when the device reports a record of it.
commands = Table(
    "commands",
    metadata,
    Column("command_id", String, primary_key=True),
    Column(
        "device_id",
        device_id_type(),
        ForeignKey("devices.device_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("action_pb", LargeBinary, nullable=False),
    Column("created_by", String, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("expire_time", UtcDateTime, nullable=False),
    Column("done_time", UtcDateTime, nullable=True),
)

# Remediation records, one row per entry of Report.remediations: idx is the
# entry's position in the report. The columns repeat fields of record_pb, the
# serialized fleetmend.v1.RemediationRecord, for filtering and statistics.
remediations = Table(
    "remediations",
    metadata,
    Column(
        "device_id",
        device_id_type(),
        ForeignKey("devices.device_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    # Empty for a record of an operator command.
    Column("rule", String, nullable=False),
    Column("command_id", String, nullable=False),
    # Field name of the Action oneof, such as "clear_cache"; empty if unset.
    Column("action", String, nullable=False),
    # A fleetmend.v1.RemediationOutcome value.
    Column("outcome", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("before", Double, nullable=False),
    Column("after", Double, nullable=False),
    Column("unit", String, nullable=False),
    # The record's start_time, or receive_time when the record carries none.
    Column("start_time", UtcDateTime, nullable=False, index=True),
    Column("duration_ms", BigInteger, nullable=False),
    Column("repeat_count", BigInteger, nullable=False),
    # Saturates at MAX_BIGINT.
    Column("bytes_freed", BigInteger, nullable=False),
    Column("record_pb", LargeBinary, nullable=False),
    Column("receive_time", UtcDateTime, nullable=False),
    # For the per-rule statistics, which read a rule's runs by start time.
    Index("ix_remediations_rule_start_time", "rule", "start_time"),
)
