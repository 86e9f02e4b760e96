"""Budgets without I/O: calendar periods in UTC, money in exact units, a call's worst case, the
per-request cap, budget validation and the Standard Webhooks signature."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from common import webhooks
from common.budgets import (
    BudgetRefusal,
    Reservation,
    WorstCase,
    cap_completion,
    parse_max_cost,
    remaining_headers,
    to_units,
    usd_text,
    validate_budget,
    window,
    worst_case,
)
from common.errors import InvalidRequest
from common.registry import Model, Price
from common.types import ChatRequest, EmbeddingsRequest


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


PERIODS = [
    # (id, period, now, start, end)
    ("daily mid-day", "daily", utc(2026, 11, 30, 13, 5), utc(2026, 11, 30), utc(2026, 12, 1)),
    ("daily at midnight exactly", "daily", utc(2026, 11, 30), utc(2026, 11, 30), utc(2026, 12, 1)),
    ("daily a microsecond before", "daily", utc(2026, 11, 30) - timedelta(microseconds=1),
     utc(2026, 11, 29), utc(2026, 11, 30)),
    ("weekly from Monday (a Monday)", "weekly", utc(2026, 11, 30, 8), utc(2026, 11, 30), utc(2026, 12, 7)),
    ("weekly on a Sunday night", "weekly", utc(2026, 12, 6, 23, 59), utc(2026, 11, 30), utc(2026, 12, 7)),
    ("weekly across a year", "weekly", utc(2027, 1, 1), utc(2026, 12, 28), utc(2027, 1, 4)),
    ("monthly", "monthly", utc(2026, 11, 30, 23), utc(2026, 11, 1), utc(2026, 12, 1)),
    ("monthly in December", "monthly", utc(2026, 12, 15), utc(2026, 12, 1), utc(2027, 1, 1)),
    ("monthly in a leap February", "monthly", utc(2028, 2, 29, 12), utc(2028, 2, 1), utc(2028, 3, 1)),
    ("a local time is its UTC instant", "daily",
     datetime(2026, 12, 1, 1, 30, tzinfo=timezone(timedelta(hours=3))), utc(2026, 11, 30), utc(2026, 12, 1)),
    ("lifetime never resets", "lifetime", utc(2026, 11, 30), utc(1970, 1, 1), None),
]


@pytest.mark.parametrize(("period", "now", "start", "end"), [c[1:] for c in PERIODS],
                         ids=[c[0] for c in PERIODS])
def test_periods_are_calendar_aligned_in_utc(period, now, start, end):
    w = window(period, now)
    assert (w.start, w.end) == (start, end)
    assert w.tag == ("0" if end is None else str(int(start.timestamp())))


def test_an_unknown_period_is_refused():
    with pytest.raises(ValueError, match="unknown period"):
        window("fortnightly", utc(2026, 1, 1))


UNITS = [
    ("one dollar", Decimal("1"), False, 10_000_000_000),
    ("the smallest unit", Decimal("0.0000000001"), False, 1),
    ("a real cost rounds half up, as Postgres stores it", Decimal("0.00000000005"), False, 1),
    ("below half a unit rounds down", Decimal("0.00000000004"), False, 0),
    ("a worst case rounds up", Decimal("0.00000000001"), True, 1),
    ("a worst case that is exact stays", Decimal("0.0000280000"), True, 280_000),
    ("$900k is still exact", Decimal("900000"), False, 9_000_000_000_000_000),
]


@pytest.mark.parametrize(("usd", "worst", "units"), [c[1:] for c in UNITS], ids=[c[0] for c in UNITS])
def test_money_in_units(usd, worst, units):
    assert to_units(usd, worst_case=worst) == units


def test_units_sum_exactly_where_floats_would_not():
    costs = [Decimal("0.0000001") * n for n in range(1, 10_001)]
    assert sum(to_units(c) for c in costs) == to_units(sum(costs, Decimal(0)))
    assert usd_text(to_units(Decimal("2.50"))) == "2.5" and usd_text(0) == "0"


PRICED = Model(provider="p", model="some-model", price=Price(input=Decimal("1.0"), output=Decimal("2.0")))
OPENAI = Model(provider="p", model="gpt-4o", price=Price(input=Decimal("2.50"), output=Decimal("10.00")),
               max_output_tokens=100)
HI = [{"role": "user", "content": "hi"}]

WORST = [
    # (id, model, request, worst tokens, worst USD)
    ("chars/3 prompt + max_tokens", PRICED, ChatRequest(model="m", messages=HI, max_tokens=10),
     (3 + 4 + 1) + 10, Decimal(8 * 1 + 10 * 2) / 10**6),
    ("max_completion_tokens wins", PRICED,
     ChatRequest(model="m", messages=HI, max_tokens=10, max_completion_tokens=20), 8 + 20,
     Decimal(8 + 20 * 2) / 10**6),
    ("no max_tokens: the model's max_output_tokens", OPENAI, ChatRequest(model="m", messages=HI),
     3 + 3 + 1 + 100, (Decimal("2.50") * 7 + Decimal("10.00") * 100) / 10**6),
    ("no max_tokens, no model maximum: 1024", PRICED, ChatRequest(model="m", messages=HI), 8 + 1024,
     Decimal(8 + 1024 * 2) / 10**6),
    ("embeddings: inputs at the input price", PRICED, EmbeddingsRequest(model="m", input=["abcdef", "abc"]),
     (2 + 1) + (1 + 1), Decimal(5) / 10**6),
    ("a free model costs nothing", Model(provider="p", model="x"), ChatRequest(model="m", messages=HI,
                                                                              max_tokens=5), 13, Decimal(0)),
]


@pytest.mark.parametrize(("model", "request_", "tokens", "usd"), [c[1:] for c in WORST],
                         ids=[c[0] for c in WORST])
def test_worst_case(model, request_, tokens, usd):
    assert worst_case(request_, model) == WorstCase(to_units(usd, worst_case=True), tokens)


def test_a_call_under_a_budget_is_sent_with_the_completion_budget_it_reserved():
    capped = cap_completion(ChatRequest(model="m", messages=HI), OPENAI)
    assert isinstance(capped, ChatRequest) and capped.max_tokens == 100
    own = ChatRequest(model="m", messages=HI, max_completion_tokens=7)
    assert cap_completion(own, OPENAI) is own


CAPS = [
    ("absent", None, None),
    ("a number", 0.5, Decimal("0.5")),
    ("a header's text", " 0.25 ", Decimal("0.25")),
    ("zero", "0", Decimal(0)),
]


@pytest.mark.parametrize(("raw", "value"), [c[1:] for c in CAPS], ids=[c[0] for c in CAPS])
def test_max_cost(raw, value):
    assert parse_max_cost(raw) == value


@pytest.mark.parametrize("raw", ["-1", "abc", True, "NaN", "Infinity"],
                         ids=["negative", "not-a-number", "bool", "nan", "infinite"])
def test_a_bad_max_cost_is_a_400_naming_it(raw):
    with pytest.raises(InvalidRequest) as caught:
        parse_max_cost(raw)
    assert caught.value.param == "max_cost_usd"


GOOD = {"name": "team", "scope": "key", "key_id": "key_1", "period": "daily", "limit_usd": "5"}
INVALID = [
    ("unknown period", {"period": "hourly"}, "period"),
    ("negative usd", {"limit_usd": "-0.01"}, "limit_usd"),
    ("negative tokens", {"limit_tokens": -1}, "limit_tokens"),
    ("too precise", {"limit_usd": "0.00000000001"}, "limit_usd"),
    ("no limit", {"limit_usd": None}, "limit_usd"),
    ("a key budget without its key", {"key_id": None}, "key_id"),
    ("a global budget naming a key", {"scope": "global"}, "key_id"),
    ("unknown scope", {"scope": "team"}, "scope"),
    ("threshold above 100", {"thresholds": [80, 101]}, "thresholds"),
    ("unknown field", {"colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_an_invalid_budget_names_its_field(change, field):
    with pytest.raises(InvalidRequest) as caught:
        validate_budget({**GOOD, **change})
    assert caught.value.param == field and field in caught.value.message


def test_a_valid_budget_and_a_patch_over_it():
    budget = validate_budget(GOOD)
    assert budget.limit_usd == Decimal(5) and budget.thresholds == [80, 95]
    patched = validate_budget({"limit_tokens": 1000, "thresholds": [95, 50, 50]}, budget.model_dump())
    assert (patched.limit_usd, patched.limit_tokens, patched.thresholds) == (Decimal(5), 1000, [50, 95])


def test_what_create_lua_is_given():
    reservation = Reservation(("P:budget:a:0", "P:budget:b:1"), WorstCase(280_000, 18), 90_000)
    assert reservation.args() == [2, 280_000, 18, 90_000, "P:budget:a:0", "P:budget:b:1"]
    refusal = BudgetRefusal("over", 1, (5, 6, 10, 0, 0, -1))
    assert (refusal.kind, refusal.index, refusal.numbers[2]) == ("over", 1, 10)


# the Standard Webhooks specification's published test vector
VECTOR = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
          b'{"test": 2432232314}', "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
SIGNATURES = [
    ("the spec's vector", VECTOR[:4], VECTOR[4], True),
    ("another body", (*VECTOR[:3], b'{"test": 1}'), VECTOR[4], False),
    ("another id", (VECTOR[0], "msg_other", *VECTOR[2:4]), VECTOR[4], False),
    ("another timestamp", (*VECTOR[:2], 1614265331, VECTOR[3]), VECTOR[4], False),
    ("another secret", ("whsec_b3RoZXI=", *VECTOR[1:4]), VECTOR[4], False),
    ("one of several signatures", VECTOR[:4], "v1,bm9wZQ== " + VECTOR[4], True),
]


@pytest.mark.parametrize(("message", "header", "valid"), [c[1:] for c in SIGNATURES],
                         ids=[c[0] for c in SIGNATURES])
def test_webhook_signature(message, header, valid):
    secret, msg_id, timestamp, body = message
    assert webhooks.verify(secret, msg_id, str(timestamp), body, header) is valid


def test_webhook_headers_sign_what_they_say():
    secret, msg_id, timestamp, body, signature = VECTOR
    headers = webhooks.headers(secret, msg_id, timestamp, body)
    assert headers["webhook-signature"] == signature
    assert (headers["webhook-id"], headers["webhook-timestamp"]) == (msg_id, str(timestamp))


RESERVED = Reservation(("a", "b"), WorstCase(1000, 50), 1, after=[(100, 1000, 10_000, 0, 50, -1),
                                                                   (0, 1000, 5_000, 20, 50, 500)])
REMAINING = [
    ("no budget", None, "0.0000000400", 30, {}),
    ("the tightest budget, its worst case given back, its cost taken", RESERVED, "0.0000000400", 30,
     {"x-gateway-budget-remaining-usd": "0.00000046", "x-gateway-budget-remaining-tokens": "450"}),
    ("never below zero", Reservation(("a",), WorstCase(10, 1), 1, after=[(0, 10, 10, 0, 0, -1)]),
     "0.000001", 0, {"x-gateway-budget-remaining-usd": "0"}),
    ("a cost it cannot read: no headers", RESERVED, "n/a", 30, {}),
]


@pytest.mark.parametrize(("reservation", "cost", "tokens", "headers"), [c[1:] for c in REMAINING],
                         ids=[c[0] for c in REMAINING])
def test_remaining_budget_headers(reservation, cost, tokens, headers):
    assert remaining_headers(reservation, cost, tokens) == headers


# ---- the budget book's index: a call's budgets are a lookup, in creation order ---------------------------
def _b(name: str, key_id: str | None = None) -> Any:
    from common.budgetrows import Budget
    return Budget(id=name, name=name, scope="key" if key_id else "global", key_id=key_id)


@pytest.mark.parametrize(("order", "key", "expected"), [
    ([], "k1", []),
    ([("g1", None)], "k1", ["g1"]),
    ([("a", "k1"), ("b", "k2")], "k1", ["a"]),
    ([("a", "k1"), ("g1", None), ("c", "k1"), ("g2", None)], "k1", ["a", "g1", "c", "g2"]),
    ([("g1", None), ("a", "k1"), ("g2", None)], "k1", ["g1", "a", "g2"]),
    ([("g1", None), ("a", "k1"), ("g2", None)], "nobody", ["g1", "g2"]),
])
def test_the_book_index_keeps_each_keys_budgets_with_the_global_ones_in_order(order, key, expected):
    from common.budgetrows import _index
    everyone, by_key = _index([_b(name, key_id) for name, key_id in order])
    assert [b.name for b in by_key.get(key, everyone)] == expected
