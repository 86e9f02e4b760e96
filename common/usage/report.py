"""Usage reports read from the rollups (``usage_hourly``, ``usage_daily``), never from the raw rows.

The rollups are kept by a trigger on ``usage`` (migration 0005): every row a statement really inserts
is added to its hour's and its day's bucket in the same transaction, and a row that was not inserted
(a redelivered ``call_id``: ``ON CONFLICT DO NOTHING``) is not in the statement's transition table, so
nothing here can count a call twice. The API (``api/usage_routes.py``, ``api/admin/usage.py``), the
CLI and a dashboard call these functions; none has its own SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, literal, or_, select, union_all
from sqlalchemy.orm import sessionmaker

from common.db import UsageDaily, UsageHourly
from common.errors import InvalidRequest
from common.usage.query import UsageQuery, ceil_hour, floor_hour, plan

MAX_GROUPS = 100_000  # a report's rows held in memory and sent at once (a year by hour × key × model is more)
METRICS = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "queue_wait_ms",
           "upstream_latency_ms")


@dataclass
class UsageGroup:
    """One group's sums. ``errors``: usage rows whose outcome is not ``success`` (the upstream refused
    or failed, the answer was unusable, or the attempt was lost with its worker). ``requests`` counts
    upstream calls: a request retried or moved to a fallback counts each try."""

    group: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    queue_wait_ms: int = 0
    upstream_latency_ms: int = 0

    def add(self, other: UsageGroup) -> None:
        for name in METRICS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def mean_queue_wait_ms(self) -> float | None:
        return round(self.queue_wait_ms / self.requests, 3) if self.requests else None

    @property
    def mean_upstream_latency_ms(self) -> float | None:
        return round(self.upstream_latency_ms / self.requests, 3) if self.requests else None


@dataclass
class UsageReport:
    query: UsageQuery
    groups: list[UsageGroup]

    @property
    def total(self) -> UsageGroup:
        """Every group summed (exact: integers and Decimals)."""
        total = UsageGroup()
        for group in self.groups:
            total.add(group)
        return total


Rollup = type[UsageHourly] | type[UsageDaily]


def _part(table: Rollup, ranges: list[tuple[datetime, datetime]], query: UsageQuery) -> Select[Any]:
    """The rows of ``table`` in ``ranges`` that match the query's filters."""
    conditions: list[ColumnElement[bool]] = [
        or_(*(and_(table.bucket >= lo, table.bucket < hi) for lo, hi in ranges))]
    for column, values in ((table.api_key_id, query.keys), (table.model, query.models),
                           (table.provider, query.providers)):
        if values:
            conditions.append(column.in_(values))
    return select(table.bucket, table.api_key_id, table.model, table.provider,
                  *(getattr(table, name) for name in METRICS)).where(*conditions)


def report(sessions: sessionmaker, query: UsageQuery, *, max_groups: int = MAX_GROUPS) -> UsageReport:
    """The query's groups with their sums, ordered by time then key, model, provider. Reads at most one
    daily row per day and one hourly row per edge hour for each key × model × provider. More than
    ``max_groups`` groups is an :class:`InvalidRequest` (naming ``group_by``), not a huge answer."""
    daily, hourly = plan(query.since, query.until, hourly_only="hour" in query.group_by)
    parts = ([_part(UsageDaily, daily, query)] if daily else []) + ([_part(UsageHourly, hourly, query)]
                                                                    if hourly else [])
    rows = union_all(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
    by = {"day": func.date_trunc("day", rows.c.bucket, literal("UTC")), "hour": rows.c.bucket,
          "key": rows.c.api_key_id, "model": rows.c.model, "provider": rows.c.provider}
    keys = [by[name].label(name) for name in query.group_by]
    sums = [func.coalesce(func.sum(rows.c[name]), 0).label(name) for name in METRICS]
    statement = select(*keys, *sums)
    if keys:
        statement = statement.group_by(*keys).order_by(*keys).limit(max_groups + 1)
    with sessions() as session:
        result = session.execute(statement).all()
    if len(result) > max_groups:
        raise InvalidRequest(f"this report has more than {max_groups:,} groups; ask for a shorter window, "
                             "filter it, or group by less", param="group_by")
    groups = [UsageGroup(group={name: _label(name, row[i]) for i, name in enumerate(query.group_by)},
                         **{name: _metric(name, row[len(keys) + j]) for j, name in enumerate(METRICS)})
              for row in result]
    # an ungrouped report over no rows still gets one row of sums (zeros): it is left out
    return UsageReport(query, [g for g in groups if g.requests] if not keys else groups)


def spent(sessions: sessionmaker, scope: str | None, since: datetime, until: datetime) -> Decimal:
    """USD spent by the key ``scope`` (None: the whole gateway) in the whole hours overlapping
    ``[since, until)`` — exact (Decimal, scale 10), read from the rollups. For budgets: a calendar
    period's start is a whole hour, and ``until`` = now includes the current hour so far."""
    query = UsageQuery(since=floor_hour(since), until=ceil_hour(until), keys=(scope,) if scope else ())
    return report(sessions, query).total.cost_usd


def _label(name: str, value: Any) -> str:
    # a timestamptz comes back in the session's time zone: the buckets are UTC hours and days
    if name == "day":
        return f"{value.astimezone(UTC):%Y-%m-%d}"
    if name == "hour":
        return f"{value.astimezone(UTC):%Y-%m-%dT%H:00:00Z}"
    return str(value)


def _metric(name: str, value: Any) -> Any:
    return Decimal(value) if name == "cost_usd" else int(value)
