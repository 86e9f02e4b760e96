"""A key's budgets as part of the key, over real HTTP: created with the key (``POST /admin/keys``), shown
with it (``GET /admin/keys/<id>``, the same figures as ``/admin/budgets``), replaced by name on
``PATCH``, enforced (402) like any budget, and validated with a 400 naming the field; the CLI's
``keys create --budget`` through the same service.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.integration.conftest import wait_until
from tests.integration.test_auth import cli

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-for-key-budget-tests"
HI = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.fixture(scope="module")
def gateway_env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "GATEWAY_AUTH": "required", "GATEWAY_ADMIN_KEY": ADMIN}


def admin(api, method: str, path: str, body: Any = None) -> requests.Response:
    return requests.request(method, f"{api.url}/admin{path}", json=body, timeout=10,
                            headers={"Authorization": f"Bearer {ADMIN}"})


def chat(api, secret: str) -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", json=HI, timeout=30,
                         headers={"Authorization": f"Bearer {secret}"})


def known(api, secret: str) -> None:
    """Wait until the API knows a new key (it caches the key set for about a second)."""
    wait_until(lambda: requests.get(f"{api.url}/v1/budget", headers={"Authorization": f"Bearer {secret}"},
                                    timeout=10).status_code == 200, timeout=10, interval=0.2)


def test_a_key_created_with_a_budget_gets_402_past_it(api):
    # 20 tokens a day: the first call (its prompt and max_tokens 10 reserved, a few real tokens used)
    # fits; once its real use is settled, the next call's worst case no longer does
    created = admin(api, "POST", "/keys", {"name": "capped", "budgets": [
        {"name": "daily-tokens", "period": "daily", "limit_tokens": 20, "thresholds": [50]}]})
    assert created.status_code == 201, created.text
    key = created.json()
    [shown] = key["budgets"]
    assert (shown["name"], shown["scope"], shown["key_id"], shown["period"]) == (
        "daily-tokens", "key", key["id"], "daily")
    assert shown["limit_tokens"] == 20 and shown["resets_at"] and shown["thresholds"] == [50]
    known(api, key["secret"])

    first = chat(api, key["secret"])
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    refused = chat(api, key["secret"])
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and "daily-tokens" in error["message"]

    got = admin(api, "GET", f"/keys/{key['id']}").json()
    [figures] = got["budgets"]
    assert figures["spent_tokens"] == used and figures["reserved_tokens"] == 0
    alone = admin(api, "GET", f"/budgets/{shown['id']}").json()
    assert figures == {k: v for k, v in alone.items() if k != "alerts"}   # the same view as /admin/budgets
    listed = admin(api, "GET", f"/budgets?key_id={key['id']}").json()["data"]
    assert [b["id"] for b in listed] == [shown["id"]] and listed[0]["spent_tokens"] == used


@pytest.mark.parametrize(("method", "budgets", "param"), [
    ("POST", [{"name": "d", "period": "fortnightly", "limit_usd": "1"}], "budgets[0].period"),
    ("POST", [{"name": "d", "period": "daily", "limit_usd": "1"}, {"name": "e", "period": "daily"}],
     "budgets[1].limit_usd"),
    ("POST", [{"name": "d", "period": "daily", "limit_usd": "-1"}], "budgets[0].limit_usd"),
    ("POST", [{"name": "d", "period": "daily", "limit_usd": "1", "scope": "global"}], "budgets[0].scope"),
    ("PATCH", [{"name": "d", "period": "daily", "limit_usd": "1"}] * 2, "budgets[1].name"),
    ("PATCH", None, "budgets"),
], ids=["period", "second-has-no-limit", "negative", "scope", "same-name", "null"])
def test_a_bad_budget_is_a_400_naming_the_field_and_changes_nothing(api, method, budgets, param):
    before = admin(api, "GET", "/keys?limit=200").json()["data"]
    if method == "POST":
        response = admin(api, "POST", "/keys", {"name": "bad", "budgets": budgets})
    else:
        target = admin(api, "POST", "/keys", {"name": "target"}).json()
        before = admin(api, "GET", "/keys?limit=200").json()["data"]
        response = admin(api, "PATCH", f"/keys/{target['id']}", {"name": "renamed", "budgets": budgets})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param + ": ")
    assert admin(api, "GET", "/keys?limit=200").json()["data"] == before


def test_patch_replaces_the_set_by_name_and_omitting_it_keeps_it(api):
    key = admin(api, "POST", "/keys", {"name": "replace", "budgets": [
        {"name": "a", "period": "daily", "limit_usd": "1"},
        {"name": "b", "period": "monthly", "limit_tokens": 1000}]}).json()
    ids = {b["name"]: b["id"] for b in key["budgets"]}

    untouched = admin(api, "PATCH", f"/keys/{key['id']}", {"metadata": {"x": 1}}).json()
    assert {b["name"]: b["id"] for b in untouched["budgets"]} == ids

    patched = admin(api, "PATCH", f"/keys/{key['id']}", {"budgets": [
        {"name": "a", "period": "weekly", "limit_usd": "2"},
        {"name": "c", "period": "lifetime", "limit_tokens": 5}]})
    assert patched.status_code == 200, patched.text
    after = {b["name"]: b for b in patched.json()["budgets"]}
    assert sorted(after) == ["a", "c"]
    assert after["a"]["id"] == ids["a"] and (after["a"]["period"], after["a"]["limit_usd"]) == ("weekly", "2")
    assert after["c"]["resets_at"] is None                         # lifetime
    assert admin(api, "GET", f"/budgets/{ids['b']}").status_code == 404

    cleared = admin(api, "PATCH", f"/keys/{key['id']}", {"budgets": []}).json()
    assert cleared["budgets"] == [] and admin(api, "GET", f"/budgets/{ids['a']}").status_code == 404


def test_a_lowered_budget_on_the_key_refuses_the_next_call_at_once(api):
    key = admin(api, "POST", "/keys", {"name": "lowered", "budgets": [
        {"name": "spend", "period": "monthly", "limit_usd": "1"}]}).json()
    known(api, key["secret"])
    assert chat(api, key["secret"]).status_code == 200
    lowered = admin(api, "PATCH", f"/keys/{key['id']}", {"budgets": [
        {"name": "spend", "period": "monthly", "limit_usd": "0.0000000001"}]})
    assert lowered.status_code == 200, lowered.text
    assert chat(api, key["secret"]).status_code == 402


def test_cli_creates_a_key_with_budgets(api, gateway_env):
    out = cli(gateway_env, "keys", "create", "--name", "from-cli", "--budget", "daily:usd=5",
              "--budget", "monthly:tokens=1000000,name=month")
    key_id = out.split()[2]
    assert "budget daily, budget month" in out
    got = admin(api, "GET", f"/keys/{key_id}").json()
    assert [(b["name"], b["period"], b["limit_usd"], b["limit_tokens"]) for b in got["budgets"]] == [
        ("daily", "daily", "5", None), ("month", "monthly", None, 1000000)]
