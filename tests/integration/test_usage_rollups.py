"""The rollups on the real Postgres, without the API: every writer of ``usage`` keeps them (the flusher's
batches, the async settle path, a plain ``INSERT``), each row counted once however often it is written;
concurrent flushers touching the same buckets never deadlock; migration 0005 backfills existing rows."""

from __future__ import annotations

import random
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from common.contract import JobState
from common.db import MIGRATIONS_DIR, make_session_factory
from common.jobrows import insert_usage
from common.outbox import RowOutcome
from common.settings import normalise_database_url
from workers.usage import UsageLedger

pytestmark = pytest.mark.integration

SUMS = ("count(*)", "count(*) FILTER (WHERE outcome <> 'success')", "sum(prompt_tokens)",
        "sum(completion_tokens)", "sum(cost_usd)", "sum(queue_wait_ms)", "sum(upstream_latency_ms)")
ROLLED = ("sum(requests)", "sum(errors)", "sum(input_tokens)", "sum(output_tokens)", "sum(cost_usd)",
          "sum(queue_wait_ms)", "sum(upstream_latency_ms)")


@pytest.fixture(scope="module")
def sessions(database_url):
    return make_session_factory(normalise_database_url(database_url), pool_size=8)


def row(call_id: str, i: int) -> dict[str, Any]:
    return {"call_id": call_id, "job_id": f"job{i}", "api_key_id": f"key_{i % 5}", "model": f"m{i % 3}",
            "provider": f"p{i % 2}", "provider_model": "pm", "prompt_tokens": i % 97,
            "completion_tokens": i % 13,
            "cost_usd": Decimal(i % 1000) * Decimal("0.0000000001"), "queue_wait_ms": i % 7,
            "upstream_latency_ms": i % 300, "outcome": "success" if i % 9 else "upstream_error",
            "status_code": 200}


def assert_rollups_match(db) -> tuple[Any, ...]:
    """Both rollups sum to exactly what the raw rows say, overall and per key × model × provider."""
    raw = db.execute(f"SELECT {', '.join(SUMS)} FROM usage").fetchone()
    for table in ("usage_hourly", "usage_daily"):
        assert db.execute(f"SELECT {', '.join(ROLLED)} FROM {table}").fetchone() == raw, table
        per_group = ("SELECT coalesce(api_key_id, 'anonymous'), model, provider, {} FROM {} GROUP BY 1, 2, 3 "
                     "ORDER BY 1, 2, 3")
        assert (db.execute(per_group.format(", ".join(ROLLED), table)).fetchall()
                == db.execute(per_group.format(", ".join(SUMS), "usage")).fetchall()), table
    return tuple(raw)


def test_concurrent_flushers_on_the_same_buckets_count_each_row_once(sessions, db):
    """Six flushers write shuffled, overlapping batches (a third of each batch written by another flusher
    too, as after a redelivery): no deadlock, no row counted twice."""
    ledger = UsageLedger(sessions)
    tag = secrets.token_hex(3)
    rows = [row(f"{tag}:{i}", i) for i in range(3000)]
    batches = []
    for b in range(30):
        batch = rows[b * 100:(b + 1) * 100] + random.Random(b).sample(rows, 50)  # 50 written elsewhere too
        random.Random(b + 100).shuffle(batch)
        batches.append(batch)
    with ThreadPoolExecutor(6) as pool:
        refused = list(pool.map(ledger.record_many, batches))
    assert refused == [[]] * 30
    raw = assert_rollups_match(db)
    assert raw[0] == db.execute("SELECT count(*) FROM usage").fetchone()[0]
    assert db.execute("SELECT count(*) FROM usage WHERE call_id LIKE %s", (f"{tag}:%",)).fetchone()[0] == 3000


def test_outbox_settles_and_flushes_at_once_never_deadlock(sessions, db):
    """Async outcomes (one usage row per statement, many per transaction: the outbox) settle while
    batches of sync rows flush, all into the same buckets, in shuffled order."""
    ledger = UsageLedger(sessions)
    tag = secrets.token_hex(3)
    finished = datetime.now(UTC)
    work: list[tuple[Any, list[Any]]] = []
    for b in range(24):
        rows = [row(f"{tag}:{b}:{i}", i) for i in random.Random(b).sample(range(1000), 60)]
        if b % 2:
            work.append((ledger.record_many, rows))
        else:
            work.append((ledger.settle_many, [RowOutcome(f"job-{tag}-{b}-{i}", JobState.SUCCEEDED, finished,
                                                         usage_row=r) for i, r in enumerate(rows)]))
    with ThreadPoolExecutor(6) as pool:
        refused = list(pool.map(lambda w: w[0](w[1]), work))
    assert refused == [[]] * 24
    written = db.execute("SELECT count(*) FROM usage WHERE call_id LIKE %s", (f"{tag}:%",)).fetchone()[0]
    assert written == 24 * 60
    assert_rollups_match(db)


def test_every_writer_keeps_the_rollups(sessions, db):
    before = db.execute("SELECT sum(requests) FROM usage_hourly").fetchone()[0] or 0
    tag = secrets.token_hex(3)
    with sessions.begin() as session:  # the async settle path (jobrows), twice for the same call
        insert_usage(session, row(f"{tag}:async", 1))
        insert_usage(session, row(f"{tag}:async", 1))
    db.execute("INSERT INTO usage (call_id, job_id, api_key_id, model, provider, provider_model, outcome) "
               "VALUES (%s, 'j', NULL, 'm', 'p', 'pm', 'success') ON CONFLICT (call_id) DO NOTHING",
               (f"{tag}:by-hand",))
    with pytest.raises(RuntimeError), sessions.begin() as session:  # a failed transaction counts nothing
        insert_usage(session, row(f"{tag}:rolled-back", 2))
        raise RuntimeError("the job's settle failed after its usage row")
    assert db.execute("SELECT sum(requests) FROM usage_hourly").fetchone()[0] == before + 2
    assert db.execute("SELECT requests FROM usage_daily WHERE api_key_id = 'anonymous'").fetchone() == (1,)
    assert_rollups_match(db)


def test_the_migration_backfills_the_rows_that_exist(database_url, db):
    assert_rollups_match(db)
    count = db.execute("SELECT count(*) FROM usage").fetchone()[0]
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", normalise_database_url(database_url))
    command.downgrade(config, "0003_idempotency")
    assert db.execute("SELECT to_regclass('usage_hourly')").fetchone() == (None,)
    db.execute("INSERT INTO usage (call_id, job_id, api_key_id, model, provider, provider_model, cost_usd, "
               "outcome, created_at) VALUES ('old:1', 'j', 'key_old', 'm', 'p', 'pm', 0.0000000007, "
               "'failed', '2025-01-31 23:59:59+00')")
    command.upgrade(config, "head")
    raw = assert_rollups_match(db)
    assert raw[0] == count + 1
    assert db.execute("SELECT (bucket AT TIME ZONE 'UTC')::text, requests, errors, cost_usd::text "
                      "FROM usage_daily WHERE api_key_id = 'key_old'").fetchall() == [
        ("2025-01-31 00:00:00", 1, 1, "0.0000000007")]
