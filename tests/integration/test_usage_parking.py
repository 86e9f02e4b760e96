"""A usage row Postgres refuses is parked with its error and never blocks the rows queued with it —
on the real Redis usage stream and the real Postgres ``usage`` table (bigint columns since 0002).
Async jobs' outcomes on the same stream (the outbox) settle their rows once, with their usage rows."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
import requests

from common.apikeys import ANONYMOUS
from common.contract import JobSpec, JobState, Kind, Mode
from common.db import make_session_factory
from common.jobrows import JobRows
from common.jobs import JobStore
from common.outbox import RowOutcome
from common.settings import normalise_database_url
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import wait_until
from workers.usage import UsageFlusher, UsageLedger, UsageRecord

pytestmark = pytest.mark.integration


def usage_row(call_id: str, **overrides: Any) -> dict[str, Any]:
    record = UsageRecord(
        call_id=call_id,
        job_id="job-" + call_id[:8],
        api_key_id=None,
        model="fake-model",
        provider="fake",
        provider_model="fake-model",
        prompt_tokens=3,
        completion_tokens=4,
        cost_usd=Decimal("0.000001"),
        queue_wait_ms=1,
        upstream_latency_ms=2,
        outcome="success",
        status_code=200,
    )
    return {**record.as_row(), **overrides}


# id, what the poison row holds, what its parked error names
POISON = [
    ("beyond-bigint", {"prompt_tokens": 10**20}, "NumericValueOutOfRange"),
    ("not-a-number", {"completion_tokens": "many"}, "InvalidTextRepresentation"),
    ("no-model", {"model": None}, "NotNullViolation"),
    ("job-id-too-long", {"job_id": "j" * 100}, "StringDataRightTruncation"),
    ("cost-not-a-number", {"cost_usd": "free"}, "InvalidTextRepresentation"),
]


@pytest.fixture
def flusher(database_url: str) -> Iterator[UsageFlusher]:
    store = JobStore(redis.Redis.from_url(TEST_REDIS_URL), "gwpark" + secrets.token_hex(4))
    ledger = UsageLedger(make_session_factory(normalise_database_url(database_url)))
    flusher = UsageFlusher(store, ledger, consumer="test")
    flusher.ensure_group()
    yield flusher
    store.redis.delete(flusher.key, flusher.parked_key())


def queue(flusher: UsageFlusher, row: dict[str, Any] | str) -> None:
    flusher.store.redis.xadd(
        flusher.key, {"u": row if isinstance(row, str) else json.dumps(row, default=str)}
    )


def written(db, call_ids: list[str]) -> set[str]:
    rows = db.execute("SELECT call_id FROM usage WHERE call_id = ANY(%s)", (call_ids,)).fetchall()
    return {r[0] for r in rows}


@pytest.mark.parametrize(("poison", "reason"), [p[1:] for p in POISON], ids=[p[0] for p in POISON])
def test_a_poison_row_is_parked_and_the_batch_is_written(flusher, db, poison, reason):
    good = [f"good-{secrets.token_hex(6)}" for _ in range(3)]
    bad = f"bad-{secrets.token_hex(6)}"
    queue(flusher, usage_row(good[0]))
    queue(flusher, usage_row(bad, **poison))
    for call_id in good[1:]:
        queue(flusher, usage_row(call_id))

    assert flusher.flush_once(block_ms=None) == 4
    assert written(db, [*good, bad]) == set(good)
    parked = flusher.store.redis.xrange(flusher.parked_key())
    assert len(parked) == 1
    fields = parked[0][1]
    assert json.loads(fields[b"u"])["call_id"] == bad and reason in fields[b"error"].decode()
    assert flusher.store.redis.xlen(flusher.key) == 0  # all acked and deleted: the next flush is not stuck
    assert flusher.flush_once(block_ms=None) == 0


def test_an_unreadable_entry_is_parked(flusher, db):
    good = f"good-{secrets.token_hex(6)}"
    queue(flusher, "{not json")
    queue(flusher, usage_row(good))
    assert flusher.flush_once(block_ms=None) == 2
    assert written(db, [good]) == {good}
    [(_, fields)] = flusher.store.redis.xrange(flusher.parked_key())
    assert fields[b"u"] == b"{not json" and b"not a usage row" in fields[b"error"]


def test_a_field_the_table_does_not_know_is_dropped_not_the_row(flusher, db):
    call_ids = [f"new-{secrets.token_hex(6)}" for _ in range(2)]
    queue(flusher, usage_row(call_ids[0], colour="red"))  # first in the batch: its keys lead the insert
    queue(flusher, usage_row(call_ids[1]))
    assert flusher.flush_once(block_ms=None) == 2
    assert written(db, call_ids) == set(call_ids)
    assert flusher.store.redis.xlen(flusher.parked_key()) == 0


def test_token_counts_beyond_integer_fit_the_bigint_columns(flusher, db):
    call_id = f"big-{secrets.token_hex(6)}"
    queue(flusher, usage_row(call_id, prompt_tokens=3_000_000_000))
    assert flusher.flush_once(block_ms=None) == 1
    assert db.execute("SELECT prompt_tokens FROM usage WHERE call_id = %s", (call_id,)).fetchone() == (
        3_000_000_000,
    )
    assert flusher.store.redis.xlen(flusher.parked_key()) == 0


def test_a_worker_parks_a_poison_row_and_keeps_billing(api, fake, db, prefix):
    """Through the real worker's flusher: a poison row already in the stream does not hold back the
    usage of calls made after it."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    store = JobStore(client, prefix)
    bad = f"bad-{secrets.token_hex(6)}"
    client.xadd(store.usage_key(), {"u": json.dumps(usage_row(bad, prompt_tokens=10**20), default=str)})
    response = requests.post(
        f"{api.url}/v1/chat/completions",
        timeout=30,
        json={"model": "fake-model", "messages": [{"role": "user", "content": "bill me"}]},
    )
    assert response.status_code == 200
    job_id = response.headers["x-gateway-job-id"]
    wait_until(
        lambda: db.execute("SELECT 1 FROM usage WHERE job_id = %s", (job_id,)).fetchone() is not None,
        timeout=30,
    )
    parked = f"{store.usage_key()}:parked"
    wait_until(
        lambda: any(json.loads(f[b"u"])["call_id"] == bad for _, f in client.xrange(parked)), timeout=30
    )
    assert written(db, [bad]) == set()


# the outbox: async jobs' outcomes on the same stream (field "j", common/outbox.py) ----------------
def open_job(flusher: UsageFlusher) -> str:
    job_id = "job_" + secrets.token_hex(12)
    spec = JobSpec(Mode.ASYNC, Kind.CHAT, "fake-model", "fake", {"messages": []}, ANONYMOUS)
    JobRows(flusher.ledger.sessions).add(job_id, spec, max_wait=60)
    return job_id


def queue_outcome(flusher: UsageFlusher, outcome: RowOutcome) -> None:
    flusher.store.redis.xadd(flusher.key, {"j": outcome.to_json()})


def row_of(db, job_id: str) -> tuple[str, Any, Any]:
    return db.execute("SELECT status, result, error FROM jobs WHERE id = %s", (job_id,)).fetchone()


def test_an_outcome_settles_its_row_with_its_usage_row_once(flusher, db):
    job_id, call_id = open_job(flusher), f"job:1:{secrets.token_hex(6)}"
    done = RowOutcome(job_id, JobState.SUCCEEDED, datetime.now(UTC), result={"answer": 42},
                      usage={"cost_usd": "0.1"}, usage_row=usage_row(call_id, job_id=job_id))
    queue_outcome(flusher, done)
    queue(flusher, usage_row(f"sync-{secrets.token_hex(6)}"))  # a sync call's row, in the same batch
    queue_outcome(flusher, replace(done, state=JobState.FAILED, result=None, error={"code": "late"}))
    assert flusher.flush_once(block_ms=None) == 3
    assert row_of(db, job_id) == ("succeeded", {"answer": 42}, None)  # the first outcome wins
    assert written(db, [call_id]) == {call_id}
    assert flusher.store.redis.xlen(flusher.parked_key()) == 0


def test_an_outcome_postgres_refuses_is_parked_and_its_row_still_closed(flusher, db):
    job_id = open_job(flusher)
    poison = RowOutcome(job_id, JobState.SUCCEEDED, datetime.now(UTC), result={"text": "nul \u0000"})
    queue_outcome(flusher, poison)
    assert flusher.flush_once(block_ms=None) == 1
    status, result, error = row_of(db, job_id)
    assert (status, result, error["code"]) == ("failed", None, "outcome_unstorable")
    [(_, fields)] = flusher.store.redis.xrange(flusher.parked_key())
    assert RowOutcome.parse(fields[b"j"]).job_id == job_id and b"UntranslatableCharacter" in fields[b"error"]
