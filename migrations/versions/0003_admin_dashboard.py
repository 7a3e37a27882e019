"""admin dashboard: farm_state (pause flag), queue_samples, metric counters, indexes for the admin queries

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "farm_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paused_by", sa.String(length=200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_farm_state_single_row"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO farm_state (id, paused) VALUES (1, false)")
    op.create_table(
        "queue_samples",
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False),
        sa.Column("running", sa.Integer(), nullable=False),
        sa.Column("broker_waiting", sa.Integer(), nullable=True),
        sa.Column("workers_alive", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("sampled_at"),
    )
    op.create_table(
        "metric_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=500), server_default="", nullable=False),
        sa.Column("key", sa.String(length=64), server_default="", nullable=False),
        sa.Column("value", sa.Double(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("name", "model", "key"),
    )
    op.create_table(
        "metrics_counted_jobs",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_metrics_counted_jobs_finished_at", "metrics_counted_jobs", ["finished_at"], unique=False)
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"], unique=False)
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"], unique=False)
    op.create_index("ix_job_images_created_at", "job_images", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_job_images_created_at", table_name="job_images")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_created_at", table_name="jobs")
    op.drop_index("ix_metrics_counted_jobs_finished_at", table_name="metrics_counted_jobs")
    op.drop_table("metrics_counted_jobs")
    op.drop_table("metric_counters")
    op.drop_table("queue_samples")
    op.drop_table("farm_state")
