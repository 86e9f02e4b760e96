"""Writing what an upstream call cost, in Postgres.

A usage row's ``call_id`` (``<job>:<attempt>:<try>``) is unique and every insert is
``ON CONFLICT DO NOTHING``: a redelivered task or a re-read stream entry never doubles a bill.

Rows of synchronous calls reach Postgres through the Redis stream ``P:usage`` (appended by the same
script that settles the job): every worker process runs a :class:`UsageFlusher` in the consumer group
``ledger`` that inserts them in batches and acks them only after the commit. Entries a dead worker
read but never acked are claimed by the others after ``CLAIM_IDLE_MS``. Nothing is lost while Redis
keeps its data (run it with AOF in production, as the broker needs anyway).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from common.db import Usage
from common.jobrows import insert_usage
from common.jobs import JobStore

log = logging.getLogger(__name__)

GROUP = "ledger"
BATCH = 500
CLAIM_IDLE_MS = 30_000
LINGER_S = 0.2         # after a short batch, let rows gather: a few inserts a second, not one per call
CLAIM_EVERY_S = 15.0   # how often to look for entries a dead worker read but never acked


@dataclass(frozen=True)
class UsageRecord:
    call_id: str
    job_id: str
    api_key_id: str | None
    model: str
    provider: str
    provider_model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    queue_wait_ms: int
    upstream_latency_ms: int
    outcome: str
    status_code: int | None
    error: str | None = None

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


class UsageLedger:
    """Usage rows into Postgres. (An async job's usage row is written with its job row instead, in one
    transaction: ``common/jobrows.py``.)"""

    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def record(self, usage: UsageRecord) -> None:
        """Write a usage row (at most once per call_id)."""
        with self.sessions.begin() as session:
            insert_usage(session, usage.as_row())

    def record_many(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.sessions.begin() as session:
                session.execute(insert(Usage).on_conflict_do_nothing(index_elements=["call_id"]), rows)


class UsageFlusher:
    """Drains the usage stream into Postgres in batches; one per worker process."""

    def __init__(self, store: JobStore, ledger: UsageLedger, consumer: str) -> None:
        self.store = store
        self.ledger = ledger
        self.consumer = consumer
        self.key = store.usage_key()
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def flush_once(self, block_ms: int | None = 1000, *, recover: bool = True) -> int:
        """Move one batch to Postgres: with ``recover``, first our own unacked entries and abandoned
        ones, then new ones. Returns how many rows were written."""
        entries = (recover and (self._read("0", None) or self._claim_abandoned())) or self._read(">", block_ms)
        if not entries:
            return 0
        rows = [json.loads(fields[b"u"]) for _, fields in entries]
        self.ledger.record_many(rows)
        ids = [entry_id for entry_id, _ in entries]
        self.store.redis.xack(self.key, GROUP, *ids)
        self.store.redis.xdel(self.key, *ids)
        return len(rows)

    def _read(self, start: str, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = self.store.redis.xreadgroup(GROUP, self.consumer, {self.key: start}, count=BATCH, block=block_ms)
        return reply[0][1] if reply else []

    def _claim_abandoned(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = self.store.redis.xautoclaim(self.key, GROUP, self.consumer, CLAIM_IDLE_MS, "0-0", count=BATCH)
        return [entry for entry in reply[1] if entry[1]]

    def ensure_group(self) -> None:
        try:
            self.store.redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                self.ensure_group()
                recovered_at = 0.0
                while True:
                    recover = time.monotonic() - recovered_at > CLAIM_EVERY_S
                    if recover:
                        recovered_at = time.monotonic()
                    if self.flush_once(recover=recover) < BATCH:
                        time.sleep(LINGER_S)
                    backoff = 0.5
            except (redis.RedisError, SQLAlchemyError, OSError) as exc:
                log.warning("usage flush failed (%s); entries stay pending, retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
