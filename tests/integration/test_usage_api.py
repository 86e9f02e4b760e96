"""The usage & billing API through the real thing: calls through the API and workers to the fake upstream
(some failing on command), usage rows flushed into Postgres, rollups kept by the trigger — and
``/v1/usage`` / ``/admin/usage`` must equal what the raw rows say, exactly (Decimal cost), each key seeing
only its own. A redelivered usage row is counted once; the CSV export sums to the JSON."""

from __future__ import annotations

import csv
import io
import secrets
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
import requests

from common.apikeys import KeyService
from common.db import make_session_factory
from common.errors import InvalidRequest
from common.jobs import JobStore
from common.keyschema import KeyCreate
from common.settings import normalise_database_url
from common.usage import report, spent
from common.usage.query import UsageQuery, ceil_hour, floor_hour
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import ROOT, Api, wait_until

pytestmark = pytest.mark.integration

ADMIN = "admin-" + secrets.token_hex(8)
FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")


@pytest.fixture(scope="module")
def sessions(database_url):
    return make_session_factory(normalise_database_url(database_url), pool_size=2)


@pytest.fixture(scope="module")
def keys(sessions) -> dict[str, tuple[str, str]]:
    """Two client keys: ``{"a": (key_id, secret), "b": ...}``."""
    service = KeyService(sessions)
    created = {name: service.create(KeyCreate(name=f"usage-{name}")) for name in ("a", "b")}
    return {name: (row.id, secret) for name, (row, secret) in created.items()}


@pytest.fixture(scope="module")
def usage_api(gateway_env, workers, keys, tmp_path_factory):
    env = {**gateway_env, "GATEWAY_AUTH": "required", "GATEWAY_ADMIN_KEY": ADMIN}
    server = Api(env, tmp_path_factory.mktemp("usage") / "api.log").start()
    yield server
    server.kill()


def window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"from": f"{now - timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}",
            "to": f"{now + timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}"}


def get(api: Api, path: str, secret: str, **params: str) -> requests.Response:
    return requests.get(f"{api.url}{path}", params=params, headers={"Authorization": f"Bearer {secret}"},
                        timeout=30)


def raw(db, group_by: tuple[str, ...] = (), key_id: str | None = None
        ) -> dict[tuple[str, ...], dict[str, Any]]:
    """What the raw usage rows say, aggregated here in Python (independent of the trigger's SQL)."""
    rows = db.execute("SELECT api_key_id, model, provider, created_at, prompt_tokens, completion_tokens, "
                      "cost_usd, queue_wait_ms, upstream_latency_ms, outcome FROM usage").fetchall()
    groups: dict[tuple[str, ...], dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": Decimal(0),
                 "wait": 0, "latency": 0})
    for key, model, provider, created, p_tokens, c_tokens, cost, wait, latency, outcome in rows:
        if key_id is not None and key != key_id:
            continue
        created = created.astimezone(UTC)
        labels = {"day": f"{created:%Y-%m-%d}", "hour": f"{created:%Y-%m-%dT%H:00:00Z}", "key": key,
                  "model": model, "provider": provider}
        group = groups[tuple(labels[name] for name in group_by)]
        group["requests"] += 1
        group["errors"] += outcome != "success"
        group["input_tokens"] += p_tokens
        group["output_tokens"] += c_tokens
        group["cost_usd"] += cost
        group["wait"] += wait
        group["latency"] += latency
    for group in groups.values():
        group["cost_usd"] = format(group["cost_usd"], "f")
        group["mean_queue_wait_ms"] = round(group.pop("wait") / group["requests"], 3)
        group["mean_upstream_latency_ms"] = round(group.pop("latency") / group["requests"], 3)
    return dict(groups)


def served(body: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(row[name] for name in body["group_by"]): {k: v for k, v in row.items()
                                                            if k not in body["group_by"]}
            for row in body["data"]}


def chat(api: Api, secret: str, text: str, **extra: Any) -> requests.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}
    return requests.post(f"{api.url}/v1/chat/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {secret}"})


def usage_rows(db) -> int:
    return db.execute("SELECT count(*) FROM usage").fetchone()[0]


def test_usage_equals_the_raw_rows_and_each_key_sees_its_own(usage_api, keys, db):
    (a_id, a), (b_id, b) = keys["a"], keys["b"]
    before = usage_rows(db)
    answers = [chat(usage_api, a, "hello " * n) for n in range(1, 5)]
    answers += [chat(usage_api, a, "status:400 refused"), chat(usage_api, a, "status:400 twice refused")]
    answers += [chat(usage_api, b, "from b " * n) for n in range(1, 4)]
    streamed = chat(usage_api, b, "a streamed one", stream=True)
    assert [r.status_code for r in answers] == [200] * 4 + [400, 400] + [200] * 3
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    job = requests.post(f"{usage_api.url}/v1/jobs", timeout=30, headers={"Authorization": f"Bearer {a}"},
                        json={"model": "fake-model", "messages": [{"role": "user", "content": "async one"}]})
    assert job.status_code == 202
    # 11 calls, each exactly one upstream try (a 400 is never retried): 11 usage rows
    wait_until(lambda: usage_rows(db) == before + 11, 30)

    everything = get(usage_api, "/admin/usage", ADMIN, group_by="key,model,provider,day,hour", **window())
    assert everything.status_code == 200, everything.text
    body = everything.json()
    assert body["group_by"] == ["day", "hour", "key", "model", "provider"]
    assert served(body) == raw(db, ("day", "hour", "key", "model", "provider"))
    assert body["total"] == raw(db)[()]
    assert body["total"]["errors"] == 2 and Decimal(body["total"]["cost_usd"]) > 0

    for key_id, secret in ((a_id, a), (b_id, b)):
        own = get(usage_api, "/v1/usage", secret, group_by="model,day", **window()).json()
        assert served(own) == raw(db, ("day", "model"), key_id)
        by_key = get(usage_api, "/admin/usage", ADMIN, key=key_id, group_by="model,day", **window()).json()
        assert by_key["data"] == own["data"]
    assert raw(db, (), a_id)[()]["requests"] == 7 and raw(db, (), b_id)[()]["requests"] == 4


def test_defaults_cover_this_month_and_budgets_read_spent(usage_api, keys, db, sessions):
    (a_id, a) = keys["a"]
    body = get(usage_api, "/v1/usage", a).json()
    now = datetime.now(UTC)
    assert body["from"] == f"{now:%Y-%m}-01T00:00:00Z" and body["group_by"] == []
    assert body["to"] == f"{ceil_hour(now):%Y-%m-%dT%H:%M:%SZ}"
    assert body["total"] == raw(db, (), a_id)[()]
    since, until = floor_hour(now - timedelta(days=2)), ceil_hour(now)
    assert spent(sessions, a_id, since, until) == Decimal(raw(db, (), a_id)[()]["cost_usd"])
    assert spent(sessions, None, since, until) == Decimal(raw(db)[()]["cost_usd"])
    # a window that ends on a day boundary reads whole days from the daily rollup: the same sums
    day_plan = report(sessions, UsageQuery(since=floor_hour(now).replace(hour=0) - timedelta(days=1),
                                           until=floor_hour(now).replace(hour=0) + timedelta(days=1)))
    hour_plan = report(sessions, UsageQuery(since=day_plan.query.since, until=day_plan.query.until,
                                            group_by=("hour",)))
    assert day_plan.total == hour_plan.total and day_plan.total.requests > 0
    by_key = UsageQuery(since=day_plan.query.since, until=day_plan.query.until, group_by=("key",))
    assert len(report(sessions, by_key, max_groups=2).groups) == 2
    with pytest.raises(InvalidRequest) as too_many:
        report(sessions, by_key, max_groups=1)
    assert too_many.value.param == "group_by"


def test_the_admin_report_needs_the_admin_key(usage_api, keys):
    assert get(usage_api, "/admin/usage", keys["a"][1]).status_code == 403
    assert get(usage_api, "/admin/usage.csv", keys["a"][1]).status_code == 403
    assert requests.get(f"{usage_api.url}/admin/usage", timeout=30).status_code == 401
    assert requests.get(f"{usage_api.url}/v1/usage", timeout=30).status_code == 401
    assert get(usage_api, "/v1/usage", "sk-gw-not-a-key").status_code == 401


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/v1/usage", {"from": "yesterday"}, "from"),
    ("/v1/usage", {"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, "to"),
    ("/v1/usage", {"to": "2026-13-01T00:00:00Z"}, "to"),
    ("/v1/usage", {"group_by": "key,week"}, "group_by"),
    ("/v1/usage", {"key": "key_someone_else"}, "key"),
    ("/admin/usage", {"format": "xml"}, "format"),
    ("/admin/usage", {"groupby": "day"}, "groupby"),
    ("/admin/usage", {"from": "2024-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
], ids=["from-not-rfc3339", "reversed", "no-month-13", "unknown-group", "key-on-v1", "format", "misspelt",
        "too-long"])
def test_bad_parameters_are_a_400_naming_them(usage_api, keys, path, params, param):
    reply = get(usage_api, path, ADMIN if path.startswith("/admin") else keys["a"][1], **params)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param and param in reply.json()["error"]["message"]


def test_a_redelivered_usage_row_is_counted_once(usage_api, keys, db, prefix):
    before = get(usage_api, "/admin/usage", ADMIN, **window()).json()["total"]
    columns = ("call_id", "job_id", "api_key_id", "model", "provider", "provider_model", "prompt_tokens",
               "completion_tokens", "cost_usd", "queue_wait_ms", "upstream_latency_ms", "outcome",
               "status_code", "error")
    old = dict(zip(columns, db.execute(f"SELECT {', '.join(columns)} FROM usage ORDER BY id LIMIT 1")
                   .fetchone(), strict=True))
    fresh = {**old, "call_id": f"redelivery-{secrets.token_hex(4)}:1:1", "cost_usd": Decimal("0.0000000001")}
    # the same row twice more (one batch and, maybe, the next), then a new one: the flusher inserts all three
    store = JobStore(redis.Redis.from_url(TEST_REDIS_URL), prefix)
    for row in (old, old, fresh):
        store.append_usage(row)
    wait_until(lambda: db.execute("SELECT 1 FROM usage WHERE call_id = %s", (fresh["call_id"],)).fetchone(),
               30)
    wait_until(lambda: store.redis.xlen(store.usage_key()) == 0, 30)  # every entry flushed and acked

    after = get(usage_api, "/admin/usage", ADMIN, **window()).json()["total"]
    assert after == raw(db)[()]
    assert after["requests"] == before["requests"] + 1
    assert Decimal(after["cost_usd"]) - Decimal(before["cost_usd"]) == Decimal("0.0000000001")
    assert db.execute("SELECT count(*) FROM usage WHERE call_id = %s", (old["call_id"],)).fetchone()[0] == 1


def test_the_csv_export_sums_to_the_json(usage_api, keys):
    params = {"group_by": "key,model", **window()}
    body = get(usage_api, "/admin/usage", ADMIN, **params).json()
    for path, extra in (("/admin/usage.csv", {}), ("/admin/usage", {"format": "csv"})):
        reply = get(usage_api, path, ADMIN, **params, **extra)
        assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/csv")
        assert reply.headers["Content-Disposition"].startswith('attachment; filename="usage_')
        lines = list(csv.DictReader(io.StringIO(reply.text)))
        assert [line["key"] for line in lines] == [row["key"] for row in body["data"]]
        for name in FIGURES:
            total = sum(Decimal(line[name]) for line in lines)
            assert total == Decimal(str(body["total"][name])), name
    own = get(usage_api, "/v1/usage", keys["b"][1], format="csv", group_by="model", **window())
    assert own.status_code == 200
    assert {line["model"] for line in csv.DictReader(io.StringIO(own.text))} == {"fake-model"}


def test_the_cli_reports_what_the_api_does(usage_api, gateway_env):
    params = {"group_by": "key,model", **window()}
    api_csv = get(usage_api, "/admin/usage.csv", ADMIN, **params).text
    cli = subprocess.run([sys.executable, "-m", "launcher.cli", "usage", "--group-by", "key,model",
                          "--from", params["from"], "--to", params["to"], "--csv"], cwd=ROOT, env=gateway_env,
                         check=True, capture_output=True, text=True, timeout=60)
    assert cli.stdout.splitlines() == api_csv.splitlines() and len(api_csv.splitlines()) == 3  # header, a, b
    bad = subprocess.run([sys.executable, "-m", "launcher.cli", "usage", "--group-by", "week"], cwd=ROOT,
                         env=gateway_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "'group_by'" in bad.stderr
