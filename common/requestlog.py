"""Recent calls and their figures minute by minute, read from the ``usage`` rows (one per upstream call)
and the ``jobs`` rows (async jobs). The dashboard's Requests and Overview pages call these; the admin
API may too — nothing else has this SQL.

Reads are bounded: every query is limited to a time window on the indexed ``usage.created_at``
(at most a day) and a row count, so a page never scans months of raw rows. Longer views read the
rollups (``common/usage``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, Select, func, select
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import sessionmaker

from common.db import Job, Usage

RECENT_MAX = 200
SCAN_PER_CALL = 10   # rows read per call asked for: a call has one row per try (retries, fallbacks)
WINDOW_MAX = timedelta(days=1)
SUCCESS = "success"
STATUSES = ("ok", "error")  # the Requests page's status filter: the last attempt's outcome


@dataclass(frozen=True)
class CallFilter:
    """Which calls: those whose last upstream attempt ended after ``since``; ``key``/``model``/``job``
    match exactly; ``status`` is ``ok`` (the last attempt succeeded), ``error`` or None (either)."""

    since: datetime
    key: str | None = None
    model: str | None = None
    status: str | None = None
    job: str | None = None
    limit: int = 50


@dataclass(frozen=True)
class Call:
    """One request (a job) as its upstream attempts saw it. ``queued_at`` and ``started_at`` are derived
    from the last attempt's measured queue wait and upstream latency when the job has no durable row
    (sync and streaming calls); an async job's row gives them exactly (``job_status`` set).
    ``first_token_at``: a streamed call's first chunk (its last attempt's, measured by the worker from
    the upstream call's start); None for calls that did not stream or produced nothing."""

    job_id: str
    api_key_id: str | None
    model: str
    provider: str
    provider_model: str
    attempts: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    queue_wait_ms: int
    upstream_latency_ms: int
    outcome: str
    status_code: int | None
    error: str | None
    queued_at: datetime
    started_at: datetime
    done_at: datetime
    job_status: str | None = None
    first_token_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == SUCCESS

    @property
    def total_ms(self) -> int:
        return max(0, int((self.done_at - self.queued_at).total_seconds() * 1000))


def recent_calls(sessions: sessionmaker, flt: CallFilter) -> list[Call]:
    """The latest ``flt.limit`` (at most :data:`RECENT_MAX`) calls matching ``flt``, newest first; each
    call's attempts summed (tokens, cost) and its last attempt's outcome, status code and error."""
    since = max(flt.since, datetime.now(UTC) - WINDOW_MAX)
    limit = min(max(flt.limit, 1), RECENT_MAX)

    def last(column: Any) -> Any:
        """The value of the call's latest attempt."""
        return func.array_agg(aggregate_order_by(column, Usage.created_at.desc()))[1]

    # the newest matching rows first (the created_at index, read backwards, stops after SCAN_PER_CALL
    # rows per call asked for), then only their jobs are grouped: grouping a whole day's rows to keep
    # 100 took 9 s over a million rows (docs/benchmarks.md)
    newest = select(Usage.job_id).where(Usage.created_at >= since)
    if flt.key:
        newest = newest.where(Usage.api_key_id == flt.key)
    if flt.model:
        newest = newest.where(Usage.model == flt.model)
    if flt.job:
        newest = newest.where(Usage.job_id == flt.job)
    if flt.status in STATUSES:   # a call whose last try failed has a failed row, one that succeeded a success
        succeeded = Usage.outcome == SUCCESS
        newest = newest.where(succeeded if flt.status == "ok" else ~succeeded)
    candidates = newest.order_by(Usage.created_at.desc()).limit(limit * SCAN_PER_CALL).subquery()
    query = (select(Usage.job_id, func.min(Usage.api_key_id), func.min(Usage.model), last(Usage.provider),
                    last(Usage.provider_model), func.count(), func.sum(Usage.prompt_tokens),
                    func.sum(Usage.completion_tokens), func.sum(Usage.cost_usd), last(Usage.queue_wait_ms),
                    last(Usage.upstream_latency_ms), last(Usage.outcome), last(Usage.status_code),
                    last(Usage.error), func.max(Usage.created_at), last(Usage.first_token_ms))
             .where(Usage.job_id.in_(select(candidates.c.job_id)), Usage.created_at >= since)
             .group_by(Usage.job_id).order_by(func.max(Usage.created_at).desc()).limit(limit))
    if flt.status in STATUSES:
        ok = last(Usage.outcome) == SUCCESS
        query = query.having(ok if flt.status == "ok" else ~ok)
    with sessions() as session:
        rows = session.execute(query).all()
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_([r[0] for r in rows])))}
    return [_call(row, jobs.get(row[0])) for row in rows]


def _call(row: Any, job: Job | None) -> Call:
    (job_id, key, model, provider, provider_model, attempts, tokens_in, tokens_out, cost, wait_ms,
     latency_ms, outcome, status_code, error, done_at, first_token_ms) = row
    done_at = done_at.astimezone(UTC)
    started = done_at - timedelta(milliseconds=int(latency_ms or 0))
    queued = started - timedelta(milliseconds=int(wait_ms or 0))
    # from the upstream call's start (before an async row's started_at may move ``started``)
    first_token = None if first_token_ms is None else started + timedelta(milliseconds=int(first_token_ms))
    if job is not None:
        queued = job.created_at.astimezone(UTC)
        started = (job.started_at or started).astimezone(UTC)
        done_at = (job.finished_at or done_at).astimezone(UTC)
    return Call(job_id, key, model, provider, provider_model, int(attempts), int(tokens_in or 0),
                int(tokens_out or 0), Decimal(cost or 0), int(wait_ms or 0), int(latency_ms or 0), outcome,
                status_code, error, queued, started, done_at, job.status if job is not None else None,
                first_token)


@dataclass(frozen=True)
class Minute:
    """One minute's upstream calls: counts, cost, and percentiles (ms) of the end-to-end time (queue
    wait + upstream latency) and of the queue wait alone; None when the minute had no call."""

    start: datetime
    requests: int = 0
    errors: int = 0
    cost_usd: Decimal = Decimal(0)
    p50_ms: float | None = None
    p95_ms: float | None = None
    wait_p50_ms: float | None = None
    wait_p95_ms: float | None = None


def _figures(*group: Any) -> Select[Any]:
    total = Usage.queue_wait_ms + Usage.upstream_latency_ms

    def pct(q: float, column: Any) -> Any:
        return func.percentile_cont(q).within_group(column)

    return select(*group, func.count(), func.sum((Usage.outcome != SUCCESS).cast(Integer)),
                  func.sum(Usage.cost_usd), pct(0.5, total), pct(0.95, total),
                  pct(0.5, Usage.queue_wait_ms), pct(0.95, Usage.queue_wait_ms))


def _minute(start: datetime, figures: Sequence[Any]) -> Minute:
    count, errors, cost, *percentiles = figures
    return Minute(start, int(count), int(errors or 0), Decimal(cost or 0),
                  *(None if v is None else float(v) for v in percentiles))


def summary(sessions: sessionmaker, since: datetime, until: datetime) -> Minute:
    """The figures of every call in ``[since, until)`` (at most a day) together."""
    since = max(since, until - WINDOW_MAX)
    query = _figures().where(Usage.created_at >= since, Usage.created_at < until)
    with sessions() as session:
        row = session.execute(query).one()
    return _minute(since, row)


def per_minute(sessions: sessionmaker, since: datetime, until: datetime) -> list[Minute]:
    """Every whole minute of ``[since, until)`` (at most a day) in order, empty minutes included."""
    since = max(since, until - WINDOW_MAX).replace(second=0, microsecond=0)
    minute = func.date_trunc("minute", Usage.created_at)
    query = _figures(minute).where(Usage.created_at >= since, Usage.created_at < until).group_by(minute)
    with sessions() as session:
        found = {row[0].astimezone(UTC): row[1:] for row in session.execute(query).all()}
    out, at = [], since
    while at < until:
        out.append(_minute(at, found[at]) if at in found else Minute(at))
        at += timedelta(minutes=1)
    return out
