"""jobs.batch_key, batch_id, batch_images, render_seconds: micro-batching across jobs

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("batch_key", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("batch_id", postgresql.UUID(as_uuid=True), nullable=True))
    op.add_column("jobs", sa.Column("batch_images", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("render_seconds", sa.Float(), nullable=True))
    op.create_index("ix_jobs_queued_batch_key", "jobs", ["batch_key", "created_at"],
                    postgresql_where=sa.text("status = 'queued'"))


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_batch_key", table_name="jobs")
    for column in ("render_seconds", "batch_images", "batch_id", "batch_key"):
        op.drop_column("jobs", column)
