"""budgets and budget_alerts: spend caps per key or for the whole gateway, and the soft-threshold
alerts that fired (once per budget, period and threshold) with their webhook deliveries

Revision ID: 0006_budgets
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_budgets"
down_revision = "0004_keys_admin"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=True, index=True),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("limit_usd", sa.Numeric(18, 10), nullable=True),
        sa.Column("limit_tokens", sa.BigInteger, nullable=True),
        sa.Column("thresholds", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "budget_alerts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("budget_id", sa.String(40), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold", sa.Integer, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("delivery", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("budget_id", "period_start", "threshold", name="uq_budget_alert"),
    )
    # a key budget's spent figure is rebuilt from the usage rows of its key in its period
    op.create_index("ix_usage_key_created", "usage", ["api_key_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_key_created", table_name="usage")
    op.drop_table("budget_alerts")
    op.drop_table("budgets")
