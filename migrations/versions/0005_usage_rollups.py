"""usage rollups: ``usage_hourly`` and ``usage_daily`` (bucket × key × model × provider), kept current by a
statement-level trigger on ``usage`` that sees only the rows a statement really inserted (its transition
table), so a redelivered row (``ON CONFLICT (call_id) DO NOTHING``) is never counted twice; backfilled here
from the rows that exist

Revision ID: 0005_usage_rollups
Revises: 0003_idempotency
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_usage_rollups"
down_revision = "0003_idempotency"
branch_labels = None
depends_on = None

TABLES = {"usage_hourly": "hour", "usage_daily": "day"}
# what a usage row adds to its bucket's counters (columns of the rollup → expression over usage rows)
SUMS = {
    "requests": "count(*)",
    "errors": "count(*) FILTER (WHERE outcome <> 'success')",
    "input_tokens": "sum(prompt_tokens)",
    "output_tokens": "sum(completion_tokens)",
    "cost_usd": "sum(cost_usd)",
    "queue_wait_ms": "sum(queue_wait_ms)",
    "upstream_latency_ms": "sum(upstream_latency_ms)",
}
KEYS = ("bucket", "api_key_id", "model", "provider")


def _rollup_insert(table: str, grain: str, source: str) -> str:
    """Add ``source``'s rows (usage rows) to ``table``. Rows are upserted in key order so two statements
    that touch the same buckets lock them in the same order (no deadlock between concurrent flushers);
    byte order (``COLLATE "C"``), which writers sorting in Python can match (``workers/usage.py``)."""
    columns = ", ".join((*KEYS, *SUMS))
    sums = ", ".join(SUMS.values())
    updates = ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c in SUMS)
    # rows written while auth was open before 0003 have no key: they are the anonymous caller's
    return (f"INSERT INTO {table} AS r ({columns}) "
            f"SELECT date_trunc('{grain}', created_at, 'UTC'), coalesce(api_key_id, 'anonymous'), model, "
            f"provider, {sums} FROM {source} GROUP BY 1, 2, 3, 4 "
            f"""ORDER BY 1, coalesce(api_key_id, 'anonymous') COLLATE "C", model COLLATE "C", """
            f"""provider COLLATE "C" """
            f"ON CONFLICT ({', '.join(KEYS)}) DO UPDATE SET {updates}")


def upgrade() -> None:
    for table in TABLES:
        op.create_table(
            table,
            sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
            sa.Column("api_key_id", sa.String(40), nullable=False),
            sa.Column("model", sa.String(200), nullable=False),
            sa.Column("provider", sa.String(100), nullable=False),
            sa.Column("requests", sa.BigInteger(), nullable=False),
            sa.Column("errors", sa.BigInteger(), nullable=False),
            sa.Column("input_tokens", sa.BigInteger(), nullable=False),
            sa.Column("output_tokens", sa.BigInteger(), nullable=False),
            # a row's cost has scale 10 (usage.cost_usd): their sum is exact at scale 10 too
            sa.Column("cost_usd", sa.Numeric(38, 10), nullable=False),
            sa.Column("queue_wait_ms", sa.BigInteger(), nullable=False),
            sa.Column("upstream_latency_ms", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint(*KEYS, name=f"pk_{table}"),
        )
        # /v1/usage and spent(): one key's buckets over a period
        op.create_index(f"ix_{table}_key_bucket", table, ["api_key_id", "bucket"])
    body = ";\n".join(_rollup_insert(table, grain, "new_usage") for table, grain in TABLES.items())
    op.execute(f"""
        CREATE FUNCTION usage_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {body};
            RETURN NULL;
        END $$""")
    # no writer can slip a row between the backfill and the trigger: both commit with this lock held
    op.execute("LOCK TABLE usage IN SHARE ROW EXCLUSIVE MODE")
    op.execute("CREATE TRIGGER usage_rollup AFTER INSERT ON usage REFERENCING NEW TABLE AS new_usage "
               "FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup()")
    for table, grain in TABLES.items():
        op.execute(_rollup_insert(table, grain, "usage"))


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS usage_rollup ON usage")
    op.execute("DROP FUNCTION IF EXISTS usage_rollup()")
    for table in TABLES:
        op.drop_table(table)
