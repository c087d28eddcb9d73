"""Add node keys, operator tokens, the audit log, outages and device revocation.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
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


def upgrade() -> None:
    # Plain ALTER TABLE, never a batch copy of the table: on SQLite, dropping
    # the old devices table would cascade to its reports.
    op.add_column("devices", _time("revoked_time", nullable=True))

    op.create_table(
        "node_keys",
        sa.Column("key_id", sa.String, nullable=False),
        sa.Column("device_id", _device_id(), nullable=False),
        sa.Column("key_hash", sa.String, nullable=False),
        _time("create_time", nullable=False),
        _time("revoke_time", nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_node_keys"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_node_keys_device_id_devices",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_node_keys_device_id", "node_keys", ["device_id"])

    op.create_table(
        "operator_tokens",
        sa.Column("token_id", sa.String, nullable=False),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("role", sa.Integer, nullable=False),
        sa.Column("token_hash", sa.String, nullable=False),
        _time("create_time", nullable=False),
        sa.Column("created_by", sa.String, nullable=False),
        _time("revoke_time", nullable=True),
        _time("last_use_time", nullable=True),
        sa.PrimaryKeyConstraint("token_id", name="pk_operator_tokens"),
        sa.UniqueConstraint("name", name="uq_operator_tokens_name"),
    )

    op.create_table(
        "audit_events",
        sa.Column("event_id", _serial_id(), nullable=False, autoincrement=True),
        _time("event_time", nullable=False),
        sa.Column("actor", sa.String, nullable=False),
        sa.Column("role", sa.Integer, nullable=True),
        sa.Column("action", sa.String, nullable=False),
        sa.Column("arguments_json", sa.Text, nullable=False),
        sa.Column("outcome", sa.String, nullable=False),
        sa.Column("peer", sa.String, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_actor", "audit_events", ["actor"])

    op.create_table(
        "outages",
        sa.Column("outage_id", _serial_id(), nullable=False, autoincrement=True),
        sa.Column("app_id", sa.String, nullable=False),
        _time("start_time", nullable=False),
        _time("end_time", nullable=False),
        sa.Column("time_zone", sa.String, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("declared_by", sa.String, nullable=False),
        _time("declare_time", nullable=False),
        sa.Column("affected_device_ids", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("outage_id", name="pk_outages"),
    )
    op.create_index("ix_outages_end_time", "outages", ["end_time"])


def downgrade() -> None:
    op.drop_index("ix_outages_end_time", table_name="outages")
    op.drop_table("outages")
    op.drop_index("ix_audit_events_actor", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("operator_tokens")
    op.drop_index("ix_node_keys_device_id", table_name="node_keys")
    op.drop_table("node_keys")
    # DROP COLUMN needs SQLite 3.35 or later.
    op.drop_column("devices", "revoked_time")
