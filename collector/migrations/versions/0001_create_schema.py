"""Create the devices and reports tables.

Revision ID: 0001
Revises:
Create Date: 2026-12-04 15:16:21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SECTIONS = ("host", "disks", "batteries", "credentials", "usage")


def _device_id() -> sa.types.TypeEngine[str]:
    # Byte-order comparison on PostgreSQL, as SQLite's default BINARY collation.
    return sa.String().with_variant(sa.String(collation="C"), "postgresql")


def _time(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    section_columns: list[sa.Column[object]] = []
    for name in SECTIONS:
        section_columns.append(sa.Column(f"{name}_pb", sa.LargeBinary, nullable=True))
        section_columns.append(
            sa.Column(
                f"{name}_sequence", sa.BigInteger, nullable=False, server_default="0"
            )
        )

    op.create_table(
        "devices",
        sa.Column("device_id", _device_id(), nullable=False),
        sa.Column("hostname", sa.String, nullable=False, server_default=""),
        sa.Column("hostname_key", sa.String, nullable=False, server_default=""),
        sa.Column("agent_version", sa.String, nullable=False, server_default=""),
        _time("first_seen", nullable=False),
        _time("last_seen", nullable=False),
        sa.Column(
            "committed_sequence", sa.BigInteger, nullable=False, server_default="0"
        ),
        _time("last_report_time", nullable=True),
        *section_columns,
        sa.PrimaryKeyConstraint("device_id", name="pk_devices"),
    )
    op.create_index("ix_devices_hostname_key", "devices", ["hostname_key"])

    op.create_table(
        "reports",
        sa.Column("device_id", _device_id(), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False, autoincrement=False),
        _time("received_time", nullable=False),
        _time("collect_time", nullable=True),
        sa.Column("is_full", sa.Boolean, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("device_id", "sequence", name="pk_reports"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_reports_device_id_devices",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("reports")
    op.drop_index("ix_devices_hostname_key", table_name="devices")
    op.drop_table("devices")
