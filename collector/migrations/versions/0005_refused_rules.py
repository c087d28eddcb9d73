"""Add the rules that each device refuses in its applied policy.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _device_id() -> sa.types.TypeEngine[str]:
    # Byte-order comparison on PostgreSQL, as SQLite's default BINARY collation.
    return sa.String().with_variant(sa.String(collation="C"), "postgresql")


def upgrade() -> None:
    # Existing devices get no refused rules, as before their first report that
    # carries a policy status.
    op.create_table(
        "refused_rules",
        sa.Column("device_id", _device_id(), nullable=False),
        sa.Column("rule_name", sa.String, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("device_id", "rule_name", name="pk_refused_rules"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_refused_rules_device_id_devices",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("refused_rules")
