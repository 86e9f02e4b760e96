"""jobs.idempotency_key: an async job created with an ``Idempotency-Key`` keeps it (and its body's
fingerprint), unique per owner, so a repeat after Redis lost the key's record still finds the job

Revision ID: 0003_idempotency
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_idempotency"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("jobs", sa.Column("idempotency_body", sa.String(64), nullable=True))
    # a job made while auth was open has no api_key_id: its owner is "anonymous" (api/idempotency.py)
    op.create_index("ix_jobs_idempotency", "jobs",
                    [sa.text("coalesce(api_key_id, 'anonymous')"), "idempotency_key"], unique=True,
                    postgresql_where=sa.text("idempotency_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_jobs_idempotency", table_name="jobs")
    op.drop_column("jobs", "idempotency_body")
    op.drop_column("jobs", "idempotency_key")
