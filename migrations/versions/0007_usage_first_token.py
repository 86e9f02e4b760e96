"""usage.first_token_ms: a streamed call's time from its upstream call's start to its first chunk
(the dashboard's request timelines show "first token"); null for calls that did not stream

Revision ID: 0007_usage_first_token
Revises: 0006_budgets
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_usage_first_token"
down_revision = "0006_budgets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("first_token_ms", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("usage", "first_token_ms")
