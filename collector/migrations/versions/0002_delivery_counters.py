"""Add dropped-report totals and clock-skew columns.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 16:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE, never a batch copy of the table: on SQLite, dropping
    # the old devices table would cascade to its reports. The server defaults
    # fill existing rows: no drops counted, no offset known, nothing flagged.
    op.add_column(
        "devices",
        sa.Column("dropped_reports", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.add_column(
        "devices", sa.Column("clock_offset_microseconds", sa.BigInteger, nullable=True)
    )
    op.add_column(
        "devices",
        sa.Column(
            "clock_skewed", sa.Boolean, nullable=False, server_default=sa.false()
        ),
    )
    op.add_column(
        "reports",
        sa.Column(
            "clock_skewed", sa.Boolean, nullable=False, server_default=sa.false()
        ),
    )


def downgrade() -> None:
    # DROP COLUMN needs SQLite 3.35 or later.
    op.drop_column("reports", "clock_skewed")
    op.drop_column("devices", "clock_skewed")
    op.drop_column("devices", "clock_offset_microseconds")
    op.drop_column("devices", "dropped_reports")
