"""Add each rule's rollout time and the fleet versions in device policy status.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rules get no rollout time, so all their runs keep counting, as
    # before this revision.
    op.add_column(
        "rule_states",
        sa.Column("rollout_time", sa.DateTime(timezone=True), nullable=True),
    )
    # Devices keep 0, "not reported", until their next policy status.
    for name in ("policy_applied_fleet_version", "policy_rejected_fleet_version"):
        op.add_column(
            "devices",
            sa.Column(name, sa.BigInteger, nullable=False, server_default="0"),
        )


def downgrade() -> None:
    # DROP COLUMN needs SQLite 3.35 or later.
    op.drop_column("devices", "policy_rejected_fleet_version")
    op.drop_column("devices", "policy_applied_fleet_version")
    op.drop_column("rule_states", "rollout_time")
