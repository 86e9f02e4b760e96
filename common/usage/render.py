"""A usage report as JSON (cost as a string: a float would round it) and as CSV (pure: no I/O)."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from decimal import Decimal, localcontext
from typing import Any

from common.usage.report import UsageGroup, UsageReport

COST_PLACES = 10   # usage.cost_usd's scale: every sum of costs is exact at it
#: a group's figures, in the order CSV columns come after the group's own columns
FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "mean_queue_wait_ms",
           "mean_upstream_latency_ms")


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def money(amount: Decimal) -> str:
    """USD as a decimal string with exactly :data:`COST_PLACES` places (a sum of nothing is ``0E-10`` or
    ``0`` to Python; it is written ``0.0000000000`` like every other figure)."""
    with localcontext() as exact:
        exact.prec = 60  # numeric(38,10) has up to 38 digits; the default context (28) would round
        return format(amount.quantize(Decimal(1).scaleb(-COST_PLACES)), "f")


def figures(group: UsageGroup) -> dict[str, Any]:
    """A group's figures; ``cost_usd`` a decimal string at full precision (10 places)."""
    return {"requests": group.requests, "errors": group.errors, "input_tokens": group.input_tokens,
            "output_tokens": group.output_tokens, "cost_usd": money(group.cost_usd),
            "mean_queue_wait_ms": group.mean_queue_wait_ms,
            "mean_upstream_latency_ms": group.mean_upstream_latency_ms}


def as_json(report: UsageReport) -> dict[str, Any]:
    """``{"object": "usage", "from", "to", "group_by", "data": [{<group>, <figures>}...], "total"}``."""
    query = report.query
    return {"object": "usage", "from": rfc3339(query.since), "to": rfc3339(query.until),
            "group_by": list(query.group_by),
            "data": [{**group.group, **figures(group)} for group in report.groups],
            "total": figures(report.total)}


def as_csv(report: UsageReport) -> str:
    """One header line (the group columns, then :data:`FIGURES`) and one line per group; the columns
    that sum (requests … cost_usd) sum to the JSON's ``total``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*report.query.group_by, *FIGURES])
    for group in report.groups:
        row = figures(group)
        writer.writerow([*(group.group[name] for name in report.query.group_by),
                         *("" if row[name] is None else row[name] for name in FIGURES)])
    return out.getvalue()


def csv_filename(report: UsageReport) -> str:
    return f"usage_{report.query.since:%Y%m%dT%H}_{report.query.until:%Y%m%dT%H}.csv"
