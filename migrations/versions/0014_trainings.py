"""trainings: a training job's progress, checkpoint, previews and result (issue 15)

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("training", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "training")
