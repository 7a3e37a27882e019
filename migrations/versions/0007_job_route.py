"""jobs.route: the queue a job's latest message went to (routing by model affinity)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("route", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "route")
