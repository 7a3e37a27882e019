"""the owner's job list index also orders by id (issue 20)

`GET /v1/jobs` lists an owner's jobs by `created_at DESC, id`. With the index on `(owner, created_at DESC)` alone,
PostgreSQL sorted every matching row (or walked `ix_jobs_created_at` past other owners' jobs) to keep one page; with
the id in it, a page is the index's first entries and the total an index-only count.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", sa.literal_column("created_at DESC"), "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", sa.literal_column("created_at DESC")])
