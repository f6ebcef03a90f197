"""tenants and tenant_daily_usage

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("rate_per_sec", sa.Double(), nullable=False),
        sa.Column("burst", sa.BigInteger(), nullable=False),
        sa.Column("daily_limit", sa.BigInteger(), nullable=False),
        sa.Column("window_limit", sa.BigInteger(), nullable=True),
        sa.Column("window_seconds", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("rate_per_sec > 0", name="ck_tenants_rate_positive"),
        sa.CheckConstraint("burst >= 1", name="ck_tenants_burst_positive"),
        sa.CheckConstraint("daily_limit >= 1", name="ck_tenants_daily_positive"),
        sa.CheckConstraint(
            "(window_limit IS NULL) = (window_seconds IS NULL)", name="ck_tenants_window_pair"
        ),
    )
    op.create_table(
        "tenant_daily_usage",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("used", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tenant_daily_usage")
    op.drop_table("tenants")
