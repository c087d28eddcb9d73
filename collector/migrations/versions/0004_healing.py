"""Add self-healing: policies, rule states, commands, remediation records.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 18:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _device_id() -> sa.types.TypeEngine[str]:
    # Byte-order comparison on PostgreSQL, as SQLite's default BINARY collation.
    return sa.String().with_variant(sa.String(collation="C"), "postgresql")


def _serial_id() -> sa.types.TypeEngine[int]:
    # SQLite assigns ids only to an INTEGER PRIMARY KEY column.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _device_foreign_key(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_id"],
        ["devices.device_id"],
        name=f"fk_{table}_device_id_devices",
        ondelete="CASCADE",
    )


def upgrade() -> None:
    # Plain ALTER TABLE, never a batch copy of the table: on SQLite, dropping
    # the old devices table would cascade to its reports. Existing devices get
    # no policy status, as before their first report that carries one.
    op.add_column(
        "devices",
        sa.Column(
            "policy_applied_version",
            sa.BigInteger,
            nullable=False,
            server_default="0",
        ),
    )
    op.add_column(
        "devices",
        sa.Column(
            "policy_rejected_version",
            sa.BigInteger,
            nullable=False,
            server_default="0",
        ),
    )
    op.add_column(
        "devices",
        sa.Column("policy_rejected_reason", sa.Text, nullable=False, server_default=""),
    )
    op.add_column(
        "devices",
        sa.Column(
            "policy_status_sequence",
            sa.BigInteger,
            nullable=False,
            server_default="0",
        ),
    )

    op.create_table(
        "policies",
        sa.Column("version", _serial_id(), nullable=False, autoincrement=True),
        sa.Column("policy_pb", sa.LargeBinary, nullable=False),
        sa.Column("set_by", sa.String, nullable=False),
        _time("set_time", nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_policies"),
    )

    op.create_table(
        "rule_states",
        sa.Column("name", sa.String, nullable=False),
        sa.Column("stage", sa.String, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _time("changed_time", nullable=False),
        sa.Column("changed_by", sa.String, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_rule_states"),
    )

    op.create_table(
        "commands",
        sa.Column("command_id", sa.String, nullable=False),
        sa.Column("device_id", _device_id(), nullable=False),
        sa.Column("action_pb", sa.LargeBinary, nullable=False),
        sa.Column("created_by", sa.String, nullable=False),
        _time("create_time", nullable=False),
        _time("expire_time", nullable=False),
        _time("done_time", nullable=True),
        sa.PrimaryKeyConstraint("command_id", name="pk_commands"),
        _device_foreign_key("commands"),
    )
    op.create_index("ix_commands_device_id", "commands", ["device_id"])

    op.create_table(
        "remediations",
        sa.Column("device_id", _device_id(), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("idx", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("rule", sa.String, nullable=False),
        sa.Column("command_id", sa.String, nullable=False),
        sa.Column("action", sa.String, nullable=False),
        sa.Column("outcome", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("before", sa.Double, nullable=False),
        sa.Column("after", sa.Double, nullable=False),
        sa.Column("unit", sa.String, nullable=False),
        _time("start_time", nullable=False),
        sa.Column("duration_ms", sa.BigInteger, nullable=False),
        sa.Column("repeat_count", sa.BigInteger, nullable=False),
        sa.Column("bytes_freed", sa.BigInteger, nullable=False),
        sa.Column("record_pb", sa.LargeBinary, nullable=False),
        _time("receive_time", nullable=False),
        sa.PrimaryKeyConstraint("device_id", "sequence", "idx", name="pk_remediations"),
        _device_foreign_key("remediations"),
    )
    op.create_index(
        "ix_remediations_rule_start_time", "remediations", ["rule", "start_time"]
    )
    op.create_index("ix_remediations_start_time", "remediations", ["start_time"])


def downgrade() -> None:
    op.drop_index("ix_remediations_start_time", table_name="remediations")
    op.drop_index("ix_remediations_rule_start_time", table_name="remediations")
    op.drop_table("remediations")
    op.drop_index("ix_commands_device_id", table_name="commands")
    op.drop_table("commands")
    op.drop_table("rule_states")
    op.drop_table("policies")
    # DROP COLUMN needs SQLite 3.35 or later.
    op.drop_column("devices", "policy_status_sequence")
    op.drop_column("devices", "policy_rejected_reason")
    op.drop_column("devices", "policy_rejected_version")
    op.drop_column("devices", "policy_applied_version")
