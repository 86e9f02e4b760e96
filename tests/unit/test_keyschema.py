"""What a key carries, validated: model globs, the admin API's bodies (a 400 naming the field), the
CLI's expiry and limits spellings, and the record's expiry and model checks."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from common.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from common.keyschema import KeyCreate, KeyRecord, KeyUpdate, model_allowed, parse_body, parse_expiry
from common.registry import Limits
from launcher.keys import body_of, parse_budget, parse_limits

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("patterns", "alias", "allowed"), [
    (None, "anything", True),
    ((), "gpt-4o", False),
    (("gpt-4o",), "gpt-4o", True),
    (("gpt-4o",), "gpt-4o-mini", False),
    (("gpt-4o*",), "gpt-4o-mini", True),
    (("gpt-4o*",), "gpt-4", False),
    (("gpt-4o*",), "GPT-4o", False),
    (("claude-?-haiku",), "claude-3-haiku", True),
    (("[ab]-model",), "b-model", True),
    (("[!ab]-model",), "b-model", False),
    (("x", "fake*"), "fake-model", True),
    (("*",), "", True),
], ids=["unscoped", "empty-scope", "exact", "exact-no-prefix", "glob", "glob-miss", "case-sensitive",
        "one-char", "class", "negated-class", "any-of-many", "star"])
def test_model_allowed(patterns, alias, allowed):
    assert model_allowed(patterns, alias) is allowed


FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat()


@pytest.mark.parametrize(("body", "param"), [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": "k", "role": "owner"}, "role"),
    ({"name": "k", "allowed_models": "gpt-4o"}, "allowed_models"),
    ({"name": "k", "allowed_models": ["has space"]}, "allowed_models"),
    ({"name": "k", "allowed_models": ["m"] * 101}, "allowed_models"),
    ({"name": "k", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "k", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),
    ({"name": "k", "metadata": "x"}, "metadata"),
    ({"name": "k", "metadata": {"a": "x" * 5000}}, "metadata"),
    ({"name": "k", "limits": {"concurrency": 0}}, "limits.concurrency"),
    ({"name": "k", "limits": {"rpm": "many"}}, "limits.rpm"),
    ({"name": "k", "limits": {"rps": 1}}, "limits.rps"),
    ({"name": "k", "team": ""}, "team"),
    ({"name": "k", "secret": "mine"}, "secret"),
], ids=["no-name", "empty-name", "long-name", "role", "models-not-list", "models-pattern", "models-too-many",
        "expiry-text", "expiry-past", "expiry-naive", "metadata-not-object", "metadata-too-big",
        "limit-zero", "limit-not-int", "limit-unknown", "team-empty", "unknown-field"])
def test_a_bad_create_body_is_a_400_naming_its_field(body, param):
    with pytest.raises(InvalidRequest) as err:
        parse_body(KeyCreate, body)
    assert err.value.param == param and err.value.status == 400
    assert err.value.message.startswith(param)


def test_a_good_create_body():
    body = parse_body(KeyCreate, {"name": "k", "role": "admin", "allowed_models": ["a", "b*", "a"],
                                  "expires_at": FUTURE, "metadata": {"x": [1]}, "limits": {"rpm": 5},
                                  "team": "t"})
    assert body.allowed_models == ["a", "b*"] and body.limits == Limits(rpm=5) and body.role == "admin"
    assert parse_body(KeyCreate, {"name": "k", "limits": {}}).limits is None  # {} is "the default"


@pytest.mark.parametrize(("body", "changes"), [
    ({"name": "n"}, {"name": "n"}),
    ({"limits": None, "team": None}, {"limits": None, "team": None}),
    ({"expires_at": "2001-01-01T00:00:00Z"}, {"expires_at": datetime(2001, 1, 1, tzinfo=UTC)}),
    ({"allowed_models": None}, {"allowed_models": None}),
], ids=["rename", "clear-limits-team", "expire-now", "unscope"])
def test_an_update_changes_only_what_it_names(body, changes):
    assert parse_body(KeyUpdate, body).changes() == changes


@pytest.mark.parametrize("field", ["name", "role", "metadata"])
def test_an_update_may_not_null_a_required_field(field):
    with pytest.raises(InvalidRequest) as err:
        parse_body(KeyUpdate, {field: None})
    assert err.value.param == field


def test_a_body_that_is_not_an_object():
    with pytest.raises(InvalidRequest):
        parse_body(KeyCreate, ["name"])


@pytest.mark.parametrize(("text", "expected"), [
    ("90d", NOW + timedelta(days=90)),
    ("12h", NOW + timedelta(hours=12)),
    ("30m", NOW + timedelta(minutes=30)),
    ("2w", NOW + timedelta(weeks=2)),
    ("45s", NOW + timedelta(seconds=45)),
    ("2031-01-01T00:00:00Z", datetime(2031, 1, 1, tzinfo=UTC)),
    ("2031-01-01T02:00:00+02:00", datetime(2031, 1, 1, tzinfo=UTC)),
], ids=["days", "hours", "minutes", "weeks", "seconds", "utc", "offset"])
def test_parse_expiry(text, expected):
    assert parse_expiry(text, NOW) == expected


@pytest.mark.parametrize("text", ["soon", "10y", "2031-01-01T00:00:00"], ids=["word", "unit", "naive"])
def test_parse_expiry_refuses(text):
    with pytest.raises(InvalidRequest):
        parse_expiry(text, NOW)


@pytest.mark.parametrize(("text", "limits"), [
    ("concurrency=1,rpm=60", {"concurrency": "1", "rpm": "60"}),
    (' {"tpd": 1000} ', {"tpd": 1000}),
    ("rpm = 5,", {"rpm": "5"}),
], ids=["pairs", "json", "spaces"])
def test_cli_limits(text, limits):
    assert parse_limits(text) == limits


def test_cli_limits_refuses_a_bare_word():
    with pytest.raises(InvalidRequest):
        parse_limits("fast")


def test_record_expiry_and_scope():
    record = KeyRecord("key_1", allowed_models=("fake*",), expires_at=NOW)
    record.check_usable(NOW - timedelta(seconds=1))
    with pytest.raises(AuthenticationFailed) as err:
        record.check_usable(NOW)
    assert err.value.code == "key_expired" and "expired" in err.value.message
    record.check_model("fake-model")
    with pytest.raises(PermissionDenied) as denied:
        record.check_model("real-model")
    assert denied.value.status == 403 and denied.value.param == "model"


def _flags(**given: object) -> argparse.Namespace:
    return argparse.Namespace(**{"name": None, "role": None, "models": None, "expires": None, "team": None,
                                 "limits": None, "metadata": None, **given})


@pytest.mark.parametrize(("creating", "flags", "body"), [
    (True, {"name": "k"}, {"name": "k"}),
    (True, {"name": "k", "models": "a, b*", "team": "t", "role": "admin"},
     {"name": "k", "allowed_models": ["a", "b*"], "team": "t", "role": "admin"}),
    (False, {"models": "all", "expires": "never", "team": "none", "limits": "default"},
     {"allowed_models": None, "expires_at": None, "team": None, "limits": None}),
    (True, {"name": "k", "team": "none"}, {"name": "k", "team": "none"}),   # only update clears
    (False, {"limits": "rpm=5", "metadata": '{"a": 1}'}, {"limits": {"rpm": "5"}, "metadata": {"a": 1}}),
], ids=["name-only", "create-fields", "update-clears", "create-keeps-words", "update-sets"])
def test_cli_flags_become_the_admin_api_body(creating, flags, body):
    assert body_of(_flags(**flags), creating=creating) == body


@pytest.mark.parametrize(("text", "budget"), [
    ("daily:usd=5", {"name": "daily", "period": "daily", "limit_usd": "5"}),
    ("monthly:tokens=1000000", {"name": "monthly", "period": "monthly", "limit_tokens": "1000000"}),
    (" weekly : usd=0.25, tokens=10 ,", {"name": "weekly", "period": "weekly", "limit_usd": "0.25",
                                         "limit_tokens": "10"}),
    ("lifetime:usd=100,name=all-time", {"name": "all-time", "period": "lifetime", "limit_usd": "100"}),
], ids=["usd", "tokens", "both-spaces", "named"])
def test_cli_budget_spelling(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["daily", "daily=5", ":usd=5", "daily:usd", "daily:eur=5"],
                         ids=["no-terms", "no-colon", "no-period", "no-value", "unknown-term"])
def test_cli_budget_spelling_refused(text):
    with pytest.raises(InvalidRequest) as err:
        parse_budget(text)
    assert err.value.param == "budgets" and text in err.value.message


@pytest.mark.parametrize(("flags", "param"), [
    ({"budget": ["hourly:usd=5"]}, "budgets[0].period"),
    ({"budget": ["daily:usd=-1"]}, "budgets[0].limit_usd"),
    ({"budget": ["daily:usd=1", "daily:tokens=5"]}, "budgets[1].name"),
    ({"budget": ["daily:usd=1", "weekly:tokens=many"]}, "budgets[1].limit_tokens"),
], ids=["period", "negative", "same-name", "not-a-number"])
def test_cli_budgets_are_validated_as_the_admin_api_does(flags, param):
    with pytest.raises(InvalidRequest) as err:
        parse_body(KeyCreate, body_of(_flags(name="k", **flags), creating=True))
    assert err.value.param == param and err.value.message.startswith(param + ": ")


def test_cli_budgets_become_the_body():
    body = parse_body(KeyCreate, body_of(_flags(name="k", budget=["daily:usd=5", "monthly:tokens=7"]),
                                         creating=True))
    assert [(b.name, b.period, b.limit_usd, b.limit_tokens) for b in body.budgets or ()] == [
        ("daily", "daily", Decimal("5"), None), ("monthly", "monthly", None, 7)]


@pytest.mark.parametrize(("body", "param"), [
    ({"budgets": [{"name": "d", "period": "hourly", "limit_usd": 1}]}, "budgets[0].period"),
    ({"budgets": [{"name": "d", "period": "daily"}]}, "budgets[0].limit_usd"),
    ({"budgets": [{"name": "d", "period": "daily", "limit_usd": "1", "key_id": "x"}]}, "budgets[0].key_id"),
    ({"budgets": [{"period": "daily", "limit_usd": "1"}]}, "budgets[0].name"),
    ({"budgets": [{"name": "d", "period": "daily", "limit_tokens": 1, "thresholds": [0]}]},
     "budgets[0].thresholds"),
    ({"budgets": {"name": "d"}}, "budgets"),
    ({"budgets": None}, "budgets"),
], ids=["period", "no-limit", "key-id", "no-name", "threshold", "not-a-list", "null"])
def test_key_budgets_bad_input_names_the_field(body, param):
    with pytest.raises(InvalidRequest) as err:
        parse_body(KeyUpdate, body)
    assert err.value.param == param
