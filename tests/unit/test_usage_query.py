"""Usage report parameters, the split between the daily and hourly rollups, and the rendering."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from common.errors import InvalidRequest
from common.usage import UsageGroup, UsageQuery, UsageReport, as_csv, as_json, parse_query
from common.usage.query import parse_time, plan
from common.usage.render import money

NOW = datetime(2026, 11, 30, 4, 34, 8, tzinfo=UTC)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(("raw", "expected"), [
    ("2026-11-01T00:00:00Z", utc(2026, 11, 1)),
    ("2026-11-01t10:20:30z", utc(2026, 11, 1, 10, 20, 30)),
    ("2026-11-01T10:20:30.123456789Z", utc(2026, 11, 1, 10, 20, 30, 123456)),
    ("2026-11-01T01:00:00+01:00", utc(2026, 11, 1)),
    ("2026-11-01T01:00:00 01:00", utc(2026, 11, 1)),
    ("2026-10-31T19:00:00-05:00", utc(2026, 11, 1)),
    ("2026-11-01 00:00:00Z", utc(2026, 11, 1)),
    ("2026-11-01", utc(2026, 11, 1)),
    ("2016-12-31T23:59:60Z", utc(2016, 12, 31, 23, 59, 59)),
], ids=["zulu", "lowercase", "nanoseconds", "plus-offset", "plus-decoded-as-space", "minus-offset",
        "space-separator", "bare-date", "leap-second"])
def test_rfc3339_times(raw, expected):
    assert parse_time(raw, "from") == expected


@pytest.mark.parametrize("raw", [
    "yesterday", "2026-11-01T00:00:00", "2026-11-01T00:00Z", "1700000000", "2026-02-30",
    "2026-11-01T24:00:00Z", "2026-11-01T00:00:00+25:00", "20261101T000000Z", "2026-11-01T00:00:00Z trailing",
], ids=["word", "no-offset", "no-seconds", "epoch", "no-such-day", "hour-24", "offset-too-big",
        "basic-format", "trailing"])
def test_bad_times_name_the_parameter(raw):
    with pytest.raises(InvalidRequest) as caught:
        parse_time(raw, "to")
    assert caught.value.param == "to" and "'to'" in caught.value.message


@pytest.mark.parametrize(("args", "expected"), [
    ({}, UsageQuery(since=utc(2026, 11, 1), until=utc(2026, 11, 30, 5))),
    ({"from": "2026-11-29T10:15:00Z", "to": "2026-11-29T12:00:00Z"},
     UsageQuery(since=utc(2026, 11, 29, 10), until=utc(2026, 11, 29, 12))),
    ({"from": "2026-11-29T10:15:00Z", "to": "2026-11-29T10:16:00Z"},
     UsageQuery(since=utc(2026, 11, 29, 10), until=utc(2026, 11, 29, 11))),
    ({"group_by": "provider,key,day,key"},
     UsageQuery(since=utc(2026, 11, 1), until=utc(2026, 11, 30, 5), group_by=("day", "key", "provider"))),
    ({"group_by": " hour , model ", "format": "csv"},
     UsageQuery(since=utc(2026, 11, 1), until=utc(2026, 11, 30, 5), group_by=("hour", "model"),
                format="csv")),
    ({"key": "key_a,key_b", "model": "m", "provider": ""},
     UsageQuery(since=utc(2026, 11, 1), until=utc(2026, 11, 30, 5), keys=("key_a", "key_b"), models=("m",))),
    ({"group_by": "", "format": ""}, UsageQuery(since=utc(2026, 11, 1), until=utc(2026, 11, 30, 5))),
], ids=["defaults-this-month", "hours-floored", "partial-hour-ceiled", "canonical-order-deduplicated",
        "spaces-and-csv", "filters", "empty-values-are-defaults"])
def test_queries(args, expected):
    assert parse_query(args, NOW) == expected


@pytest.mark.parametrize(("args", "filters", "param"), [
    ({"from": "2026-12-01T00:00:00Z"}, None, "to"),
    ({"from": "2026-11-02", "to": "2026-11-02"}, None, "to"),
    ({"from": "2025-01-01", "to": "2026-11-01"}, None, "to"),
    ({"group_by": "week"}, None, "group_by"),
    ({"group_by": "day;key"}, None, "group_by"),
    ({"format": "xlsx"}, None, "format"),
    ({"key": "key_x"}, ("model", "provider"), "key"),
    ({"group": "day"}, None, "group"),
    ({"model": ",".join(f"m{i}" for i in range(101))}, None, "model"),
], ids=["from-after-default-to", "empty-window", "over-a-year", "unknown-group", "wrong-separator",
        "unknown-format", "key-not-allowed", "unknown-parameter", "too-many-values"])
def test_bad_queries_name_the_parameter(args, filters, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_query(args, NOW, **({"filters": filters} if filters else {}))
    assert caught.value.param == param and caught.value.status == 400


D, H = timedelta(days=1), timedelta(hours=1)


@pytest.mark.parametrize(("since", "until", "hourly_only", "daily", "hourly"), [
    (utc(2026, 11, 1), utc(2026, 12, 1), False, [(utc(2026, 11, 1), utc(2026, 12, 1))], []),
    (utc(2026, 11, 1, 5), utc(2026, 11, 3, 7), False, [(utc(2026, 11, 2), utc(2026, 11, 3))],
     [(utc(2026, 11, 1, 5), utc(2026, 11, 2)), (utc(2026, 11, 3), utc(2026, 11, 3, 7))]),
    (utc(2026, 11, 1), utc(2026, 11, 30, 5), False, [(utc(2026, 11, 1), utc(2026, 11, 30))],
     [(utc(2026, 11, 30), utc(2026, 11, 30, 5))]),
    (utc(2026, 11, 1, 5), utc(2026, 11, 1, 9), False, [], [(utc(2026, 11, 1, 5), utc(2026, 11, 1, 9))]),
    (utc(2026, 11, 1, 5), utc(2026, 11, 2, 9), False, [], [(utc(2026, 11, 1, 5), utc(2026, 11, 2, 9))]),
    (utc(2026, 11, 1), utc(2026, 12, 1), True, [], [(utc(2026, 11, 1), utc(2026, 12, 1))]),
], ids=["whole-month-daily", "edges-hourly", "month-to-date", "within-a-day", "no-whole-day", "by-hour"])
def test_plan_covers_the_window_once(since, until, hourly_only, daily, hourly):
    got_daily, got_hourly = plan(since, until, hourly_only=hourly_only)
    assert (got_daily, got_hourly) == (daily, hourly)
    covered = sorted(got_daily + got_hourly)
    assert covered[0][0] == since and covered[-1][1] == until
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))  # no gap, no overlap


def _report() -> UsageReport:
    query = UsageQuery(since=utc(2026, 11, 1), until=utc(2026, 11, 2), group_by=("day", "key"))
    tiny = Decimal("0.0000000001")
    return UsageReport(query, [
        UsageGroup({"day": "2026-11-01", "key": "key_a"}, 3, 1, 30, 60, tiny * 3, 30, 600),
        UsageGroup({"day": "2026-11-01", "key": "key,b"}, 1, 0, 5, 7, Decimal("1.5"), 0, 11),
    ])


def test_json_keeps_cost_exact_and_means():
    body = as_json(_report())
    assert body["from"] == "2026-11-01T00:00:00Z" and body["to"] == "2026-11-02T00:00:00Z"
    assert body["data"][0] == {"day": "2026-11-01", "key": "key_a", "requests": 3, "errors": 1,
                               "input_tokens": 30, "output_tokens": 60, "cost_usd": "0.0000000003",
                               "mean_queue_wait_ms": 10.0, "mean_upstream_latency_ms": 200.0}
    assert body["total"]["cost_usd"] == "1.5000000003" and body["total"]["requests"] == 4


@pytest.mark.parametrize(("amount", "text"), [
    (Decimal(0), "0.0000000000"),
    (Decimal("0E-10"), "0.0000000000"),
    (Decimal("1.5"), "1.5000000000"),
    (Decimal("0.0000000001") * 1_000_000, "0.0001000000"),
    (Decimal("1234567890123456789012345678.0000000001"), "1234567890123456789012345678.0000000001"),
], ids=["zero", "zero-at-scale", "short", "a-million-tiny-calls", "numeric-38-10-at-its-widest"])
def test_money_has_ten_places_and_never_rounds(amount, text):
    assert money(amount) == text


def test_csv_quotes_and_sums_to_the_total():
    text = as_csv(_report())
    lines = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ("day,key,requests,errors,input_tokens,output_tokens,cost_usd,"
                                    "mean_queue_wait_ms,mean_upstream_latency_ms")
    assert [line["key"] for line in lines] == ["key_a", "key,b"]
    total = as_json(_report())["total"]
    assert sum(Decimal(line["cost_usd"]) for line in lines) == Decimal(total["cost_usd"])
