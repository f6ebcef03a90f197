"""tenant_daily_usage.measure: what each total counts

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08

A total is the cost of the tenant's allowed limiter decisions ("decisions", what the Redis day
counter counts) or one meter's billable usage ("meter:<name>"), by ``WORKER_BACKFILL_MEASURE``.
Rows written before this revision hold NULL: the earlier release's "meter:requests" (unless
WORKER_BACKFILL_METER said otherwise). A worker replaces a total of another measure instead of
only ever raising it, so an upgrade or a changed setting does not leave old totals in place.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenant_daily_usage", sa.Column("measure", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenant_daily_usage") as batch:
        batch.drop_column("measure")
