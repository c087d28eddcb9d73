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
    ForeignKey,
    LargeBinary,
    MetaData,
    String,
    Table,
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
