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

The usage rollups (``usage_hourly``, ``usage_daily``: what ``/v1/usage`` and ``/admin/usage`` read) are
kept by a statement-level trigger on ``usage`` (migration 0005) in the same transaction as each insert,
here and in ``common/jobrows.py`` alike; it sees only the rows a statement really inserted, so a row
skipped by ``ON CONFLICT DO NOTHING`` is never counted. Writers need do nothing for it.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import redis
from sqlalchemy import BigInteger, DateTime, Integer, Numeric, TextClause, text
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

from common.apikeys import ANONYMOUS
from common.db import Usage
from common.jobrows import insert_usage, settle_outcome
from common.jobs import JobStore
from common.outbox import RowOutcome, outcome_of

log = logging.getLogger(__name__)

GROUP = "ledger"
BATCH = 500
CLAIM_IDLE_MS = 30_000
LINGER_S = 0.2         # after a short batch, let rows gather: a few inserts a second, not one per call
CLAIM_EVERY_S = 15.0   # how often to look for entries a dead worker read but never acked
PARKED_MAX = 100_000   # refused rows kept for an operator (the oldest go first)
_COLUMNS = frozenset(Usage.__table__.columns.keys())
MAX_BACKOFF_S = 2.0    # a store is down: retry at least this often (rows land seconds after it is back)
T = TypeVar("T")
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
    first_token_ms: int | None = None   # a stream: from the upstream call's start to its first chunk

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
        return _write_refusing(rows, self._insert)

    def settle_many(self, outcomes: list[RowOutcome]) -> list[tuple[int, str]]:
        """Write async jobs' outcomes from the outbox (``common/outbox.py``: each its usage row and, unless
        the row is final already, its final columns) in one transaction; refused ones as in
        :meth:`record_many`."""
        return _write_refusing(outcomes, self._settle)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        # only the table's columns: a field this version does not know (a newer worker's, in a rolling
        # upgrade) is dropped rather than costing the row
        rows = [{k: v for k, v in row.items() if k in _COLUMNS} for row in rows]
        # one statement per batch, the rows as arrays: the rollup trigger runs once per statement (an
        # executemany would be one statement, and one trigger run, per row); rows of one version all
        # have the same columns
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        # in call_id order: two flushers writing some of the same rows (a claimed entry, an outbox
        # outcome and its repair) take the unique index's locks in the same order, never a deadlock
        for row in sorted(rows, key=lambda r: str(r.get("call_id"))):
            shapes.setdefault(tuple(sorted(row)), []).append(row)
        with self.sessions.begin() as session:
            for columns, same in shapes.items():
                arrays = {name: [None if row[name] is None else str(row[name]) for row in same]
                          for name in columns}
                session.execute(_insert_arrays(columns), arrays)

    def _settle(self, outcomes: list[RowOutcome]) -> None:
        # one statement per outcome, each locking its rollup buckets: in the rollup trigger's order (key,
        # model, provider; the hour is the transaction's), so a concurrent batch never waits in a cycle
        with self.sessions.begin() as session:
            for outcome in sorted(outcomes, key=_rollup_order):
                settle_outcome(session, outcome)


_ARRAY_TYPES = ((Numeric, "numeric"), (BigInteger, "bigint"), (Integer, "integer"),
                (DateTime, "timestamptz"))


@functools.lru_cache(maxsize=16)
def _insert_arrays(columns: tuple[str, ...]) -> TextClause:
    """``INSERT INTO usage (columns) SELECT unnest(...) … ON CONFLICT (call_id) DO NOTHING``, each column
    sent as a text array and cast to its type by Postgres: a value it cannot take (``"many"`` tokens, a
    39-digit number, a job id too long for its column) fails the statement with the reason, as a
    row-by-row insert would (and the batch is retried row by row: :func:`_write_refusing`)."""
    arrays = []
    for name in columns:
        column_type = Usage.__table__.c[name].type
        sql_type = next((pg for cls, pg in _ARRAY_TYPES if isinstance(column_type, cls)), None)
        # strings stay text: the INSERT's own assignment cast refuses one too long for its column
        as_text = f"CAST(:{name} AS text[])"
        arrays.append(f"CAST({as_text} AS {sql_type}[])" if sql_type else as_text)
    return text(f"INSERT INTO usage ({', '.join(columns)}) SELECT * FROM unnest({', '.join(arrays)}) "
                "ON CONFLICT (call_id) DO NOTHING")


def _rollup_order(outcome: RowOutcome) -> tuple[str, ...]:
    """Where an outcome's usage row falls in the rollup trigger's lock order (its ``ORDER BY``, byte
    order: Python's for str); outcomes without one first."""
    row = outcome.usage_row or {}
    return tuple(str(row.get(name) or default) for name, default in (
        ("api_key_id", ANONYMOUS), ("model", ""), ("provider", ""), ("call_id", "")))


def _write_refusing(items: list[T], write: Callable[[list[T]], None]) -> list[tuple[int, str]]:
    """``write`` all ``items`` at once; if Postgres refuses one for what it holds, write them one by one
    and return the refused ones' indexes and why. Postgres failing as a whole raises."""
    if not items:
        return []
    try:
        write(items)
        return []
    except SQLAlchemyError as exc:
        if not row_at_fault(exc):
            raise
    refused = []
    for index, item in enumerate(items):
        try:
            write([item])
        except SQLAlchemyError as exc:
            if not row_at_fault(exc):
                raise
            refused.append((index, describe(exc)))
    return refused


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


def _outcome(fields: dict[bytes, bytes]) -> RowOutcome | None:
    try:
        return outcome_of(fields)
    except (KeyError, TypeError, ValueError):
        return None


def _entry_name(fields: dict[bytes, bytes]) -> str:
    if b"j" in fields:
        outcome = _outcome(fields)
        return f"outcome of job {outcome.job_id[:80]}" if outcome is not None else "outcome (unreadable)"
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
        rows: list[tuple[bytes, dict[str, Any]]] = []
        outcomes: list[tuple[bytes, RowOutcome]] = []
        parked: list[tuple[bytes, dict[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            outcome, row = (_outcome(fields), None) if b"j" in fields else (None, _usage_row(fields))
            if outcome is not None:
                outcomes.append((entry_id, outcome))
            elif row is not None:
                rows.append((entry_id, row))
            else:
                parked.append((entry_id, fields, "not a job's outcome (field 'j')" if b"j" in fields
                               else "not a usage row (no JSON object in field 'u')"))
        fields_of = dict(entries)
        refused_rows = self.ledger.record_many([row for _, row in rows])
        refused_outcomes = self.ledger.settle_many([outcome for _, outcome in outcomes])
        # a refused outcome is parked, and its row still closed: a job never stays open
        closing = [outcomes[i][1].unstorable(reason) for i, reason in refused_outcomes]
        for i, reason in self.ledger.settle_many(closing):
            log.error("job %s: its row could not be closed either (%s); it stays open",
                      closing[i].job_id, reason)
        for refused, readable in ((refused_rows, rows), (refused_outcomes, outcomes)):
            parked += [(readable[i][0], fields_of[readable[i][0]], reason) for i, reason in refused]
        self._settle([entry_id for entry_id, _ in entries], parked)
        return len(entries)

    def parked_key(self) -> str:
        """The Redis stream of rows Postgres refused: fields ``u`` (the row as queued) or ``j`` (a job's
        outcome), ``error``, ``id`` (its entry in the usage stream), ``at``. An operator fixes and
        re-queues them, or drops them."""
        return f"{self.key}:parked"

    def _settle(self, ids: list[bytes], parked: list[tuple[bytes, dict[bytes, bytes], str]]) -> None:
        """Park the refused entries and ack all of them, atomically: a row is never both lost and acked."""
        pipe = self.store.redis.pipeline(transaction=True)
        for entry_id, fields, reason in parked:
            log.warning("usage entry %s parked in %s: %s", _entry_name(fields), self.parked_key(), reason)
            kept: dict[Any, Any] = {name: fields[name] for name in (b"u", b"j") if name in fields}
            kept = kept or {b"u": b""}
            at = datetime.now(UTC).isoformat()
            pipe.xadd(self.parked_key(), {**kept, "error": reason, "id": entry_id, "at": at},
                      maxlen=PARKED_MAX, approximate=True)
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
                backoff = min(backoff * 2, MAX_BACKOFF_S)
