"""api_keys gain what the admin API manages: a role, allowed models, an expiry, the last use,
free metadata, the key's own limits and its team; an async job's row keeps the key limits it was
accepted with (a job recreated from its row after Redis lost it is admitted by them too)

Revision ID: 0004_keys_admin
Revises: 0003_idempotency
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_keys_admin"
down_revision = "0005_usage_rollups"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("role", sa.String(16), nullable=False, server_default="client"))
    op.add_column("api_keys", sa.Column("allowed_models", JSONB, nullable=True))   # NULL: every model
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("api_keys", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("api_keys", sa.Column("metadata", JSONB, nullable=False, server_default="{}"))
    op.add_column("api_keys", sa.Column("limits", JSONB, nullable=True))   # NULL: the YAML key_limits
    op.add_column("api_keys", sa.Column("team", sa.String(100), nullable=True))
    op.add_column("api_keys", sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    # the admin API pages through keys in creation order
    op.create_index("ix_api_keys_created", "api_keys", ["created_at", "id"])
    op.create_index("ix_api_keys_team", "api_keys", ["team"])
    op.add_column("jobs", sa.Column("key_limits", JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "key_limits")
    op.drop_index("ix_api_keys_team", table_name="api_keys")
    op.drop_index("ix_api_keys_created", table_name="api_keys")
    for column in ("updated_at", "team", "limits", "metadata", "last_used_at", "expires_at",
                   "allowed_models", "role"):
        op.drop_column("api_keys", column)
