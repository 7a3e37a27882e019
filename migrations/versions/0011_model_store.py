"""model_files: the shared model store's registry; jobs.phase; api_keys.can_manage_models (issue 19)

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_files",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("short_hash", sa.String(10), nullable=False),
        sa.Column("lora_hash", sa.String(12), nullable=True),
        sa.Column("legacy_hash", sa.String(8), nullable=True),
        sa.Column("architecture", sa.String(20), nullable=True),
        sa.Column("file_metadata", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("stored", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("added_by", sa.String(200), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("kind", "name", name="uq_model_files_kind_name"),
    )
    op.create_index("ix_model_files_sha256", "model_files", ["sha256"])
    op.add_column("jobs", sa.Column("phase", sa.String(20), nullable=True))
    op.add_column("api_keys", sa.Column("can_manage_models", sa.Boolean(), nullable=False,
                                        server_default=sa.text("false")))


def downgrade() -> None:
    op.drop_column("api_keys", "can_manage_models")
    op.drop_column("jobs", "phase")
    op.drop_index("ix_model_files_sha256", table_name="model_files")
    op.drop_table("model_files")
