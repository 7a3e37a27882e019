"""owner_usage: measured render seconds and images per owner and UTC day, for quotas and /v1/usage (issue 17)

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "owner_usage",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("gpu_seconds", sa.Float(), nullable=False, server_default=sa.text("0")),
        sa.Column("images", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("jobs", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    # Jobs that succeeded before this table existed count toward their day, so no owner starts with a clean slate.
    op.execute(
        """
        INSERT INTO owner_usage (owner, day, gpu_seconds, images, jobs)
        SELECT j.owner, (j.finished_at AT TIME ZONE 'UTC')::date, coalesce(sum(j.render_seconds), 0),
               coalesce(sum((SELECT count(*) FROM job_images i WHERE i.job_id = j.id)), 0), count(*)
        FROM jobs j
        WHERE j.status = 'succeeded' AND j.finished_at IS NOT NULL
        GROUP BY 1, 2
        """
    )


def downgrade() -> None:
    op.drop_table("owner_usage")
