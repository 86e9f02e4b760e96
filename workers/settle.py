"""Settling a job: the one path by which every run ends (see :meth:`Settler.settle`).

It writes an async job's row and usage row (or, with Postgres down, puts them on the outbox in the
Redis step), settles the live state in Redis and tells the waiter — waiting out a Redis outage with the
outcome in memory — and never acks an outcome that is durable nowhere (:class:`OutcomeNotDurable`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy.exc import SQLAlchemyError

from common.budgets import to_units
from common.contract import Failed, JobEvent, JobSpec, JobState, failure_state
from common.errors import GatewayError
from common.jobrows import JobRows
from common.jobs import JobStore
from common.outage import OutageLog
from common.outbox import RowOutcome
from common.settings import Settings
from workers.observe import observer
from workers.usage import UsageLedger, UsageRecord, row_at_fault

log = logging.getLogger(__name__)


class OutcomeNotDurable(Exception):
    """A job's outcome could be written neither to Redis nor to Postgres: its task must not be acked."""


REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
SETTLE_PATIENCE_S = 30.0     # a settle waits out a Redis outage at least this long (the outcome in memory)
SETTLE_RETRY_FIRST_S = 0.1   # ... retrying after this long, then twice as long each time ...
SETTLE_RETRY_MAX_S = 1.0     # ... up to this
_outages = OutageLog()
@dataclass(frozen=True)
class Settlement:
    """How a job ends: its final state, the event its waiter gets, the usage row of the call that
    settled it (if it reached upstream) and the columns of an async job's row (result/error/usage)."""

    state: JobState
    event: JobEvent
    usage: UsageRecord | None = None
    result: dict[str, Any] | None = None     # an async job's row: the answer ...
    error: dict[str, Any] | None = None      # ... or the error ...
    billed: dict[str, Any] | None = None     # ... and its token counts and cost (the row's ``usage``)
    charge: tuple[int, int] | None = None    # its budgets' charge, if not its usage row's (a replay)

    @classmethod
    def failed(cls, error: GatewayError) -> Settlement:
        return cls(failure_state(error), Failed.of(error), error=error.to_dict())


def billed_charge(billed: dict[str, Any] | None) -> tuple[int, int]:
    """The budget charge of an async row's ``usage`` column (a job replayed from its settled row)."""
    billed = billed or {}
    tokens = int(billed.get("prompt_tokens") or 0) + int(billed.get("completion_tokens") or 0)
    return to_units(Decimal(str(billed.get("cost_usd") or 0))), tokens


def budget_charge(usage: UsageRecord | None) -> tuple[int, int]:
    """What a job's budgets are charged when it settles: the cost (units of 1e-10 USD, rounded as the
    usage row stores it) and tokens of the call that settled it — the only one of its calls that can
    cost anything (a failed try's and a lost attempt's rows cost 0), so a budget's spent figure is the
    exact sum of its usage rows."""
    if usage is None:
        return 0, 0
    return to_units(usage.cost_usd), usage.prompt_tokens + usage.completion_tokens


class Settler:
    """A worker process's settle path; thread/greenlet-safe (it holds only its collaborators)."""

    def __init__(self, settings: Settings, store: JobStore, rows: JobRows, ledger: UsageLedger) -> None:
        self.settings = settings
        self.store = store
        self.rows = rows
        self.ledger = ledger

    def settle(self, job_id: str, execution: str, spec: JobSpec | None, settlement: Settlement, *,
                recorded: bool = False, state_set: bool = False) -> str:
        """Settle the job and account for its call, atomically; returns the state it settled into.

        Async job: its row and usage row in one Postgres transaction (unless ``recorded``: the row
        says so already), then the Redis state (a crash in between is repaired on redelivery by
        ``JobRunner._replay_if_settled``, not by calling upstream again). If Postgres is unreachable, the
        row's outcome rides in the Redis step instead, on the outbox (``common/outbox.py``), which
        the workers' flushers move to Postgres once it is back. Sync job: the usage row rides in the
        same Redis script that settles the job, onto the usage stream that the ledger drains into
        Postgres in batches — one round trip on the hot path. ``state_set``: the Lua already moved the
        live state (a job that expired in line); only the event is left to emit.

        Redis unreachable: the Redis step is retried with backoff for :meth:`_patience` seconds, the
        outcome kept in memory, so a caller whose upstream answered still hears it. Past that, see
        :meth:`_unsettled`."""
        observer(self.settings).settled(job_id, spec, settlement)
        usage = settlement.usage.as_row() if settlement.usage is not None else None
        is_async = spec is not None and spec.is_async
        pending = RowOutcome(job_id, settlement.state, datetime.now(UTC), settlement.result, settlement.error,
                             settlement.billed, usage) if is_async else None
        give_up = time.monotonic() + self._patience(spec)
        delay = SETTLE_RETRY_FIRST_S
        while True:
            if pending is not None and not recorded:
                recorded = self._record_row(pending)
            try:
                self.store.emit(job_id, settlement.event, final_state=None if state_set else settlement.state,
                                execution=execution, provider=spec.provider if spec is not None else "",
                                usage=None if is_async else usage, outcome=None if recorded else pending,
                                charge=settlement.charge or budget_charge(settlement.usage))
                return settlement.state
            except REDIS_DOWN as exc:
                if time.monotonic() + delay > give_up:
                    return self._unsettled(job_id, settlement, sync=not is_async, recorded=recorded)
                _outages.warn("redis", exc, "settling jobs waits for it (the outcome is kept in memory)")
                time.sleep(delay)
                delay = min(delay * 2, SETTLE_RETRY_MAX_S)

    def _record_row(self, outcome: RowOutcome) -> bool:
        """Write an async job's row and usage row; False (logged once per outage) if Postgres is down."""
        try:
            self.rows.settle(outcome.job_id, outcome.state, usage_row=outcome.usage_row,
                             result=outcome.result, error=outcome.error, usage=outcome.usage)
        except SQLAlchemyError as exc:
            if row_at_fault(exc):
                raise
            _outages.warn("postgres", exc, "async jobs' outcomes wait in the outbox (Redis) until it is back")
            return False
        return True

    def _patience(self, spec: JobSpec | None) -> float:
        """How long a settle waits out a Redis outage: ``SETTLE_PATIENCE_S``, or what is left of the job's
        task time if that is longer (a job may take its whole time limit to settle)."""
        left = spec.deadline + self.settings.task_time_limit - time.time() if spec is not None else 0.0
        return max(SETTLE_PATIENCE_S, min(left, self.settings.task_time_limit))

    def _unsettled(self, job_id: str, settlement: Settlement, *, sync: bool, recorded: bool) -> str:
        """Redis stayed down past the settle's patience. A sync call's usage row goes straight to
        Postgres (the last resort: its bill is never lost). If the outcome is durable nowhere — an
        async job whose row Postgres did not take, or a usage row it refused now too — this raises
        :class:`OutcomeNotDurable`: the task must fail without acking, so that redelivery settles it
        again (an async job whose row did commit is replayed from it, not run again)."""
        if sync and settlement.usage is not None:
            try:
                self.ledger.record(settlement.usage)
            except SQLAlchemyError as exc:
                raise OutcomeNotDurable(f"job {job_id}: neither Redis nor Postgres took its usage row"
                                        ) from exc
            log.warning("job %s: Redis unreachable; its usage row was written to Postgres directly and its "
                        "caller could not be answered", job_id)
            return settlement.state
        if not sync and not recorded:
            raise OutcomeNotDurable(f"job {job_id}: neither Redis nor Postgres took its outcome")
        log.warning("job %s: Redis unreachable; %s (%s)", job_id, "its caller could not be answered" if sync
                    else "settled in Postgres only", settlement.state)
        return settlement.state

    def record_try(self, usage: UsageRecord) -> None:
        """The usage row of a failed try: onto the usage stream (it survives a Postgres outage), or
        straight into Postgres if Redis is down."""
        try:
            self.store.queue_usage(usage.as_row())
        except REDIS_DOWN:
            self.ledger.record(usage)

    def mark_started(self, job_id: str, attempt: int, spec: JobSpec | None = None) -> None:
        """The async row says ``running`` (on ``spec``'s alias and provider) — unless Postgres is
        down: the job runs anyway, its outcome reaches the row through the outbox."""
        self._row_write(lambda: self.rows.started(job_id, attempt, spec))

    def mark_moved(self, job_id: str, attempt: int, spec: JobSpec) -> None:
        """The async row follows a job that moved to another deployment (``GET /v1/jobs/<id>`` shows
        where it is now). Postgres down: the row keeps the old provider until the job starts on the
        new one (:meth:`mark_started` writes it) or settles."""
        self._row_write(lambda: self.rows.moved(job_id, attempt, spec))

    @staticmethod
    def _row_write(write: Callable[[], None]) -> None:
        try:
            write()
        except SQLAlchemyError as exc:
            if row_at_fault(exc):
                raise
            _outages.warn("postgres", exc, "async jobs run; their rows catch up when it is back")
