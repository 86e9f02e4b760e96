"""usage counters as bigint: an upstream's token count (clamped to 1e9 per call since) must never make
a usage row unwritable — 3e9 overflowed ``integer`` and blocked every flush after it

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = ("prompt_tokens", "completion_tokens", "queue_wait_ms", "upstream_latency_ms")


def upgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger())


def downgrade() -> None:
    _retype(sa.BigInteger(), sa.Integer())


def _retype(old: sa.types.TypeEngine, new: sa.types.TypeEngine) -> None:
    for column in COLUMNS:
        op.alter_column("usage", column, type_=new, existing_type=old, existing_nullable=False,
                        existing_server_default="0")
