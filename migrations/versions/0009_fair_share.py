"""jobs.priority and front_at, owner_policies: fair share, priorities and per-owner limits (issue 17)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.add_column("jobs", sa.Column("front_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "owner_policies",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("max_priority", sa.Integer(), nullable=True),
        sa.Column("max_queued", sa.Integer(), nullable=True),
        sa.Column("rate_burst", sa.Integer(), nullable=True),
        sa.Column("rate_per_second", sa.Float(), nullable=True),
        sa.Column("gpu_seconds_per_day", sa.Float(), nullable=True),
        sa.Column("gpu_seconds_per_month", sa.Float(), nullable=True),
        sa.Column("images_per_day", sa.Integer(), nullable=True),
        sa.Column("images_per_month", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_jobs_queued_owner", "jobs", ["owner", sa.text("priority DESC"), "created_at"],
                    postgresql_where=sa.text("status = 'queued'"))
    op.create_index("ix_jobs_running_owner", "jobs", ["owner"], postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_index("ix_jobs_running_owner", table_name="jobs")
    op.drop_index("ix_jobs_queued_owner", table_name="jobs")
    op.drop_table("owner_policies")
    op.drop_column("jobs", "front_at")
    op.drop_column("jobs", "priority")
