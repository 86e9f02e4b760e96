"""Writing what an upstream call cost, in Postgres.

A usage row's ``call_id`` (``<job>:<attempt>:<try>``) is unique and every insert is
``ON CONFLICT DO NOTHING``: a redelivered task or a re-read stream entry never doubles a bill.

Rows of synchronous calls reach Postgres through the Redis stream ``P:usage`` (appended by the same
script that settles the job): every worker process runs a :class:`UsageFlusher` in the consumer group
``ledger`` that inserts them in batches and acks them only after the commit. Entries a dead worker
read but never acked are claimed by the others after ``CLAIM_IDLE_MS``. Nothing is lost while Redis
keeps its data (run it with AOF in production, as the broker needs anyway). A row Postgres refuses
for what it holds (a poison row) is parked, with its error, in the stream ``<usage stream>:parked``
and logged once; it never holds back the rows batched with it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import (
    ArgumentError,
    CompileError,
    DataError,
    DBAPIError,
    IntegrityError,
    SQLAlchemyError,
    StatementError,
)
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
PARKED_MAX = 100_000   # refused rows kept for an operator (the oldest go first)
_COLUMNS = frozenset(Usage.__table__.columns.keys())
ATTEMPT_LOST = "attempt_lost"   # the outcome of an attempt whose worker died mid-run (0 tokens, cost 0)


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

    def record_many(self, rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
        """Insert usage rows (each at most once per call_id) in one transaction. When Postgres refuses a
        row (:func:`row_at_fault`) the batch is retried row by row and the refused rows — their indexes
        and why — are returned; the others are written. Postgres failing as a whole raises (nothing
        is lost: the caller keeps the rows pending)."""
        if not rows:
            return []
        try:
            self._insert(rows)
            return []
        except SQLAlchemyError as exc:
            if not row_at_fault(exc):
                raise
        refused = []
        for index, row in enumerate(rows):
            try:
                self._insert([row])
            except SQLAlchemyError as exc:
                if not row_at_fault(exc):
                    raise
                refused.append((index, describe(exc)))
        return refused

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        # only the table's columns: a field this version does not know (a newer worker's, in a rolling
        # upgrade) is dropped rather than costing the row
        rows = [{k: v for k, v in row.items() if k in _COLUMNS} for row in rows]
        with self.sessions.begin() as session:
            session.execute(insert(Usage).on_conflict_do_nothing(index_elements=["call_id"]), rows)

def row_at_fault(exc: SQLAlchemyError) -> bool:
    """Postgres (or SQLAlchemy) refused a row for what it holds — a number out of range, a missing or
    unknown column, a bad value — rather than failing itself (a lost connection, a pool timeout)."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    return isinstance(exc, StatementError | CompileError | ArgumentError) and not isinstance(exc, DBAPIError)


def describe(exc: SQLAlchemyError) -> str:
    """The reason without the statement or its parameters (first line of the driver's message)."""
    reason = getattr(exc, "orig", None) or exc
    text = str(reason).strip()
    return f"{type(reason).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def _usage_row(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    try:
        row = json.loads(fields[b"u"])
    except (KeyError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def _call_id(fields: dict[bytes, bytes]) -> str:
    row = _usage_row(fields)
    return str(row.get("call_id"))[:80] if row is not None else "(unreadable)"


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
        ones, then new ones. A row Postgres refuses (or that is not a usage row) is parked with its
        error; the others are written. Returns how many entries were settled (written or parked)."""
        entries = ((recover and (self._read("0", None) or self._claim_abandoned()))
                   or self._read(">", block_ms))
        if not entries:
            return 0
        readable: list[tuple[bytes, dict[str, Any]]] = []
        parked: list[tuple[bytes, dict[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            row = _usage_row(fields)
            if row is None:
                parked.append((entry_id, fields, "not a usage row (no JSON object in field 'u')"))
            else:
                readable.append((entry_id, row))
        refused = self.ledger.record_many([row for _, row in readable])
        fields_of = dict(entries)
        parked += [(readable[i][0], fields_of[readable[i][0]], reason) for i, reason in refused]
        self._settle([entry_id for entry_id, _ in entries], parked)
        return len(entries)

    def parked_key(self) -> str:
        """The Redis stream of rows Postgres refused: fields ``u`` (the row as queued), ``error``, ``id``
        (its entry in the usage stream), ``at``. An operator fixes and re-queues them, or drops them."""
        return f"{self.key}:parked"

    def _settle(self, ids: list[bytes], parked: list[tuple[bytes, dict[bytes, bytes], str]]) -> None:
        """Park the refused entries and ack all of them, atomically: a row is never both lost and acked."""
        pipe = self.store.redis.pipeline(transaction=True)
        for entry_id, fields, reason in parked:
            log.warning("usage row %s parked in %s: %s", _call_id(fields), self.parked_key(), reason)
            pipe.xadd(self.parked_key(), {"u": fields.get(b"u", b""), "error": reason, "id": entry_id,
                                          "at": datetime.now(UTC).isoformat()}, maxlen=PARKED_MAX, approximate=True)
        pipe.xack(self.key, GROUP, *ids)
        pipe.xdel(self.key, *ids)
        pipe.execute()

    def _read(self, start: str, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = self.store.redis.xreadgroup(GROUP, self.consumer, {self.key: start}, count=BATCH,
                                                 block=block_ms)
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
