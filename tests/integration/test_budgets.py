"""Budgets through the real API, workers, Redis and Postgres and the fake upstream: admin CRUD, the
402 in every protocol's shape, the per-request cap, refunds, a lowered budget, 200 concurrent calls
against a budget that allows ~50 (zero overshoot), a Redis wipe reconciled from Postgres, a job
settled twice charged once, and alert webhooks signed and delivered once per threshold.

The module runs with auth required (``GATEWAY_ADMIN_KEY`` for /admin) and a webhook receiver (a real
HTTP server in this process) configured for the workers' alerts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from api.budget_gate import BudgetGate
from common import webhooks
from common.budgetrows import BudgetRows
from common.budgets import BudgetFields, Reservation, to_units, usd_text, window, worst_case
from common.contract import Failed, JobSpec, JobState, Mode
from common.db import make_session_factory
from common.errors import InternalError
from common.jobs import JobStore, new_job_id
from common.registry import load_registry
from common.types import ChatRequest
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import wait_until
from tests.integration.test_auth import cli

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-for-budget-tests"
SECRET = "whsec_" + "c2VjcmV0LWZvci1idWRnZXQtd2ViaG9va3M="
HI = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


class Receiver:
    """A webhook endpoint: records every POST (headers + raw body); answers 500 to the first
    ``fail_first`` of them."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                failing = outer.fail_first > 0
                outer.fail_first -= 1 if failing else 0
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def gateway_env(gateway_env: dict[str, str], receiver: Receiver) -> dict[str, str]:
    return {**gateway_env, "GATEWAY_AUTH": "required", "GATEWAY_ADMIN_KEY": ADMIN,
            "GATEWAY_BUDGET_WEBHOOK_URL": receiver.url, "GATEWAY_BUDGET_WEBHOOK_SECRET": SECRET}


@pytest.fixture(scope="module")
def worst(gateway_env: dict[str, str]) -> int:
    """The worst case of one HI call, in units (what the gateway reserves for it)."""
    registry = load_registry(Path(gateway_env["GATEWAY_CONFIG"]), gateway_env)
    return worst_case(ChatRequest.model_validate(HI), registry.models["fake-model"]).units


def new_key(env: dict[str, str], name: str) -> tuple[str, str]:
    out = cli(env, "keys", "create", "--name", name)
    return out.split()[2], out.strip().splitlines()[-1]


def known(api, secret: str) -> None:
    """Wait until the API knows a new key (it caches the key set for a few seconds)."""
    wait_until(lambda: requests.get(f"{api.url}/v1/budget", headers={"Authorization": f"Bearer {secret}"},
                                    timeout=10).status_code == 200, timeout=10, interval=0.2)


def admin(api, method: str, path: str, body: Any = None) -> requests.Response:
    return requests.request(method, f"{api.url}/admin{path}", json=body, timeout=10,
                            headers={"Authorization": f"Bearer {ADMIN}"})


def budget(api, key_id: str | None, **fields: Any) -> dict[str, Any]:
    body = {"name": "test", "period": "monthly", **fields}
    body.update({"scope": "key", "key_id": key_id} if key_id else {"scope": "global"})
    response = admin(api, "POST", "/budgets", body)
    assert response.status_code == 201, response.text
    return response.json()


def chat(api, secret: str, body: dict[str, Any] | None = None, **headers: str) -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", json=body or HI, timeout=30,
                         headers={"Authorization": f"Bearer {secret}", **headers})


def mine(api, secret: str) -> dict[str, Any]:
    response = requests.get(f"{api.url}/v1/budget", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert response.status_code == 200, response.text
    return {b["id"]: b for b in response.json()["data"]}


def usage_units(db, key_id: str) -> tuple[int, int]:
    count, total = db.execute("SELECT count(*), coalesce(sum(cost_usd), 0) FROM usage WHERE api_key_id = %s "
                              "AND outcome = 'success'", (key_id,)).fetchone()
    return count, to_units(Decimal(total))


# ---- admin CRUD and validation ------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "field"), [
    ({"period": "fortnightly", "limit_usd": "1"}, "period"),
    ({"period": "daily", "limit_usd": "-1"}, "limit_usd"),
    ({"period": "daily", "limit_tokens": -5}, "limit_tokens"),
    ({"period": "daily"}, "limit_usd"),
    ({"period": "daily", "limit_usd": "1", "thresholds": [150]}, "thresholds"),
    ({"period": "daily", "limit_usd": "1", "surprise": 1}, "surprise"),
], ids=["unknown-period", "negative-usd", "negative-tokens", "no-limit", "threshold-range", "unknown-field"])
def test_an_invalid_budget_is_a_400_naming_the_field(api, body, field):
    response = admin(api, "POST", "/budgets", {"name": "bad", "scope": "global", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_admin_crud(api, gateway_env):
    key_id, _ = new_key(gateway_env, "crud")
    created = budget(api, key_id, period="daily", limit_usd="2.5", thresholds=[50])
    assert (created["limit_usd"], created["spent_usd"]) == ("2.5", "0") and created["resets_at"].endswith("Z")
    listed = admin(api, "GET", f"/budgets?key_id={key_id}").json()["data"]
    assert [b["id"] for b in listed] == [created["id"]]
    patched = admin(api, "PATCH", f"/budgets/{created['id']}", {"limit_tokens": 1000})
    assert patched.status_code == 200 and patched.json()["limit_tokens"] == 1000
    assert patched.json()["limit_usd"] == "2.5"
    assert admin(api, "GET", f"/budgets/{created['id']}").json()["alerts"] == []
    assert admin(api, "DELETE", f"/budgets/{created['id']}").json()["deleted"] is True
    assert admin(api, "GET", f"/budgets/{created['id']}").status_code == 404
    unknown_key = {"name": "x", "scope": "key", "key_id": "key_nope", "period": "daily", "limit_usd": "1"}
    assert admin(api, "POST", "/budgets", unknown_key).status_code == 404
    client = requests.get(f"{api.url}/admin/budgets", timeout=10,
                          headers={"Authorization": f"Bearer {new_key(gateway_env, 'client')[1]}"})
    assert client.status_code == 403


# ---- refusals --------------------------------------------------------------------------------------------
def test_a_spent_budget_is_a_402_in_each_protocol_and_never_a_429(api, gateway_env):
    key_id, secret = new_key(gateway_env, "broke")
    b = budget(api, key_id, name="zero", period="weekly", limit_usd="0")
    auth = {"Authorization": f"Bearer {secret}"}
    openai = chat(api, secret)
    anthropic = requests.post(f"{api.url}/v1/messages", headers=auth, timeout=10, json={
        "model": "fake-model", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    ollama = requests.post(f"{api.url}/api/chat", headers=auth, timeout=10, json={
        "model": "fake-model", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
    assert [r.status_code for r in (openai, anthropic, ollama)] == [402, 402, 402]
    error = openai.json()["error"]
    assert error["code"] == "budget_exceeded"
    for text in ("'zero'", b["id"], "weekly", "spent $0", "$0 limit", b["resets_at"]):
        assert text in error["message"]
    assert openai.headers["x-gateway-budget-id"] == b["id"]
    assert openai.headers["x-gateway-budget-resets-at"] == b["resets_at"]
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "billing_error"
    assert "zero" in anthropic.json()["error"]["message"]
    assert isinstance(ollama.json()["error"], str) and "zero" in ollama.json()["error"]
    stream = chat(api, secret, {**HI, "stream": True})
    assert stream.status_code == 402


def test_max_cost_over_the_worst_case_is_a_400_before_it_runs(api, gateway_env, worst, fake):
    _, secret = new_key(gateway_env, "capped")
    below = str(Decimal(worst - 1) / 10**10)
    by_body = chat(api, secret, {**HI, "max_cost_usd": below})
    by_header = chat(api, secret, **{"x-gateway-max-cost": below})
    assert (by_body.status_code, by_header.status_code) == (400, 400)
    assert by_body.json()["error"]["param"] == "max_cost_usd"
    assert "max_cost_usd" in by_header.json()["error"]["message"]
    fine = chat(api, secret, {**HI, "max_cost_usd": str(Decimal(worst) / 10**10)})
    assert fine.status_code == 200, fine.text
    assert "max_cost_usd" not in fake.requests()[-1]["body"]  # ours: never sent upstream
    anthropic = requests.post(f"{api.url}/v1/messages", timeout=10, headers={"x-api-key": secret}, json={
        "model": "fake-model", "max_tokens": 10, "max_cost_usd": "0",
        "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.status_code == 400 and anthropic.json()["type"] == "error"
    assert "max_cost_usd" in anthropic.json()["error"]["message"]


def test_failed_and_cancelled_calls_refund_their_reservation(api, gateway_env, worst):
    key_id, secret = new_key(gateway_env, "refunds")
    b = budget(api, key_id, limit_usd=str(Decimal(worst * 3) / 10**10))
    rejected = {**HI, "messages": [{"role": "user", "content": "status:400 no"}]}
    assert chat(api, secret, rejected).status_code == 400
    queued = requests.post(f"{api.url}/v1/jobs", timeout=10, headers={"Authorization": f"Bearer {secret}"},
                           json={**HI, "model": "stalled-model"})   # no worker serves it: it stays queued
    assert queued.status_code == 202
    held = mine(api, secret)[b["id"]]
    assert (held["spent_usd"], held["reserved_usd"]) == ("0", usd_text(worst))
    cancel = requests.delete(f"{api.url}/v1/jobs/{queued.json()['id']}", timeout=10,
                             headers={"Authorization": f"Bearer {secret}"})
    assert cancel.status_code == 200, cancel.text
    after = mine(api, secret)[b["id"]]
    assert (after["spent_usd"], after["reserved_usd"]) == ("0", "0")


def test_a_lowered_budget_blocks_the_next_call_at_once(api, gateway_env):
    key_id, secret = new_key(gateway_env, "lowered")
    b = budget(api, key_id, limit_usd="1")
    ok = chat(api, secret)
    assert ok.status_code == 200
    assert Decimal(ok.headers["x-gateway-cost-usd"]) > 0
    remaining = Decimal(ok.headers["x-gateway-budget-remaining-usd"])
    assert remaining == 1 - Decimal(ok.headers["x-gateway-cost-usd"])
    assert admin(api, "PATCH", f"/budgets/{b['id']}", {"limit_usd": "0.0000001"}).status_code == 200
    assert chat(api, secret).status_code == 402


def test_a_budget_another_process_adds_applies_within_the_books_bound(api, gateway_env):
    # written straight to Postgres (as another API process's admin call would be): this process learns
    # of it only from its book's background refresh, every BOOK_TTL_S
    key_id, secret = new_key(gateway_env, "elsewhere")
    known(api, secret)
    assert chat(api, secret).status_code == 200
    rows = BudgetRows(make_session_factory(gateway_env["DATABASE_URL"], pool_size=1))
    rows.create(BudgetFields(name="elsewhere", period="daily", limit_usd="0.0000001", scope="key",
                             key_id=key_id))
    wait_until(lambda: chat(api, secret).status_code == 402, timeout=10, interval=0.2)


# ---- the concurrency proof ---------------------------------------------------------------------------
# the fake reports 12 prompt tokens and 10 completion tokens: exactly the worst case the gateway
# reserves for this body (12 = 3 priming + 4 framing + ceil(15 characters / 3))
EXACT = {**HI, "messages": [{"role": "user", "content": "tokens:12,10 hi"}]}


def test_200_concurrent_calls_never_overshoot_the_budget(api, gateway_env, db):
    """200 calls at once against a budget that holds exactly 50 of them, each costing exactly its
    worst case: exactly 50 succeed and spend the whole budget — not one unit more (zero overshoot:
    every admitted call reserved its worst case in the step that queued it) — the other 150 get 402,
    and the usage rows sum exactly to the spent figure."""
    registry = load_registry(Path(gateway_env["GATEWAY_CONFIG"]), gateway_env)
    model = registry.models["fake-model"]
    worst = worst_case(ChatRequest.model_validate(EXACT), model).units
    assert worst == to_units(model.price.cost(12, 10))
    key_id, secret = new_key(gateway_env, "crowd")
    limit = worst * 50
    b = budget(api, key_id, limit_usd=str(Decimal(limit) / 10**10), thresholds=[100])
    known(api, secret)
    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(lambda _: chat(api, secret, EXACT).status_code, range(200)))
    assert set(codes) <= {200, 402}, codes
    succeeded = codes.count(200)
    assert (succeeded, codes.count(402)) == (50, 150)
    wait_until(lambda: usage_units(db, key_id)[0] == succeeded, timeout=20)
    figures = mine(api, secret)[b["id"]]
    spent = to_units(Decimal(figures["spent_usd"]))
    assert spent == limit and figures["reserved_usd"] == "0"
    assert usage_units(db, key_id)[1] == spent


# ---- Redis losing the state ----------------------------------------------------------------------------
def test_a_redis_wipe_is_rebuilt_from_postgres_with_live_reservations(api, gateway_env, worst, db, prefix):
    key_id, secret = new_key(gateway_env, "wiped")
    b = budget(api, key_id, limit_usd="1")
    for _ in range(3):
        assert chat(api, secret).status_code == 200
    queued = requests.post(f"{api.url}/v1/jobs", timeout=10, headers={"Authorization": f"Bearer {secret}"},
                           json={**HI, "model": "stalled-model"})
    assert queued.status_code == 202
    before = mine(api, secret)[b["id"]]
    client = redis.Redis.from_url(TEST_REDIS_URL)
    wiped = list(client.scan_iter(f"{prefix}:budget:{b['id']}:*"))
    assert wiped and client.delete(*wiped)
    after = mine(api, secret)[b["id"]]   # rebuilt: usage rows (Postgres or still on the stream) + live jobs
    assert (after["spent_usd"], after["reserved_usd"]) == (before["spent_usd"], before["reserved_usd"])
    wait_until(lambda: usage_units(db, key_id)[0] == 3, timeout=20)
    assert usage_units(db, key_id)[1] == to_units(Decimal(after["spent_usd"]))
    requests.delete(f"{api.url}/v1/jobs/{queued.json()['id']}", timeout=10,
                    headers={"Authorization": f"Bearer {secret}"})
    assert mine(api, secret)[b["id"]]["reserved_usd"] == "0"   # released once, never negative
    assert chat(api, secret).status_code == 200


def test_a_job_settled_twice_is_charged_once(api, gateway_env, prefix, worst):
    """The settle of a redelivered job (or a withdraw racing it) charges nothing more: the job's one
    charge is marked on it in the same Lua step."""
    key_id, secret = new_key(gateway_env, "twice")
    b = budget(api, key_id, limit_usd="1")
    mine(api, secret)  # the hash exists
    store = JobStore(redis.Redis.from_url(TEST_REDIS_URL), prefix)
    gate = BudgetGate(store, make_session_factory(gateway_env["DATABASE_URL"]), 60)
    budget_key = gate.state.key(gate.rows.get(b["id"]), window("monthly", datetime.now(UTC)))
    registry = load_registry(Path(gateway_env["GATEWAY_CONFIG"]), gateway_env)
    request = ChatRequest.model_validate(HI)
    spec = JobSpec.of(request, mode=Mode.SYNC, model="fake-model", provider="stalled", api_key_id=key_id)
    job_id = new_job_id()
    store.create(job_id, spec, max_wait=5, reply_to="", ttl=60,
                 budget=Reservation((budget_key,), worst_case(request, registry.models["fake-model"]),
                                    60_000))
    assert mine(api, secret)[b["id"]]["reserved_usd"] == usd_text(worst)
    event = Failed.of(InternalError("x"))
    assert store.emit(job_id, event, final_state=JobState.FAILED, charge=(1234, 7))
    store.redis.hset(store.job_key(job_id), "state", "running")   # as if redelivered and run again
    assert store.emit(job_id, event, final_state=JobState.FAILED, charge=(1234, 7))
    figures = mine(api, secret)[b["id"]]
    assert (figures["spent_usd"], figures["reserved_usd"]) == ("0.0000001234", "0")
    assert figures["spent_tokens"] == 7


# ---- alerts -------------------------------------------------------------------------------------------
def test_thresholds_fire_one_signed_webhook_each_per_period(api, gateway_env, receiver, worst, db, prefix):
    key_id, secret = new_key(gateway_env, "alerted")
    receiver.received.clear()
    receiver.fail_first = 1   # the first delivery is retried
    b = budget(api, key_id, limit_usd=str(Decimal(worst * 4) / 10**10), thresholds=[1, 2])
    for _ in range(3):
        assert chat(api, secret).status_code == 200
    client = redis.Redis.from_url(TEST_REDIS_URL)

    def ours() -> list[tuple[dict[str, str], bytes]]:
        return [(h, body) for h, body in receiver.received
                if json.loads(body)["data"]["budget_id"] == b["id"]]

    def drained() -> bool:
        groups = client.xinfo_groups(f"{prefix}:budget:alerts")
        return all(g["pending"] == 0 and (g["lag"] or 0) == 0 for g in groups) and len(ours()) >= 3
    wait_until(drained, timeout=30)
    assert chat(api, secret).status_code == 200   # past both thresholds already: nothing more fires
    wait_until(drained, timeout=30)
    received = ours()
    assert sorted(json.loads(body)["data"]["threshold_percent"] for _, body in received) == [1, 1, 2]
    for headers, body in received:
        assert headers["webhook-signature"].startswith("v1,")
        assert webhooks.verify(SECRET, headers["webhook-id"], headers["webhook-timestamp"], body,
                               headers["webhook-signature"])
        assert not webhooks.verify("whsec_b3RoZXI=", headers["webhook-id"], headers["webhook-timestamp"],
                                   body, headers["webhook-signature"])
    rows = db.execute("SELECT threshold, delivery, attempts FROM budget_alerts WHERE budget_id = %s "
                      "ORDER BY threshold", (b["id"],)).fetchall()
    assert sorted(rows) in ([(1, "delivered", 2), (2, "delivered", 1)],
                            [(1, "delivered", 1), (2, "delivered", 2)])   # the first POST got a 500


def test_a_stream_cut_off_midway_is_charged_for_what_it_produced(api, gateway_env, db):
    key_id, secret = new_key(gateway_env, "cut")
    b = budget(api, key_id, limit_usd="1")
    body = {**HI, "stream": True, "max_tokens": 50,
            "messages": [{"role": "user", "content": "drop: one two three four five six"}]}
    with requests.post(f"{api.url}/v1/chat/completions", json=body, stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {secret}"}) as response:
        assert response.status_code == 200
        registry = load_registry(Path(gateway_env["GATEWAY_CONFIG"]), gateway_env)
        worst = worst_case(ChatRequest.model_validate(body), registry.models["fake-model"])
        # a stream's headers go out before its cost is known: what remains with its worst case reserved
        assert response.headers["x-gateway-budget-remaining-usd"] == usd_text(10**10 - worst.units)
        text = b"".join(response.iter_content(None)).decode()
    assert '"content"' in text and "error" in text   # a chunk went out, then the break
    def rows() -> int:
        return db.execute("SELECT count(*) FROM usage WHERE api_key_id = %s", (key_id,)).fetchone()[0]
    wait_until(rows, timeout=20)
    outcome, completion, cost = db.execute("SELECT outcome, completion_tokens, cost_usd FROM usage "
                                           "WHERE api_key_id = %s", (key_id,)).fetchone()
    assert outcome == "upstream_stream_broken" and completion > 0 and cost > 0
    figures = mine(api, secret)[b["id"]]
    assert (to_units(Decimal(figures["spent_usd"])), figures["reserved_usd"]) == (to_units(cost), "0")


def test_an_async_job_over_budget_is_a_402_and_its_row_says_so(api, gateway_env, db):
    key_id, secret = new_key(gateway_env, "async-broke")
    budget(api, key_id, limit_tokens=5)
    response = requests.post(f"{api.url}/v1/jobs", json=HI, timeout=10,
                             headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 402 and response.json()["error"]["code"] == "budget_exceeded"
    job_id = response.headers["x-gateway-job-id"]
    status, error = db.execute("SELECT status, error FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert status == "failed" and error["code"] == "budget_exceeded"


def test_a_stream_its_caller_leaves_is_charged_for_what_it_produced(api, gateway_env, db):
    key_id, secret = new_key(gateway_env, "left")
    b = budget(api, key_id, limit_usd="1")
    words = " ".join(f"word{i}" for i in range(60))
    body = {**HI, "stream": True, "max_tokens": 100,
            "messages": [{"role": "user", "content": f"drip:0.002 {words}"}]}
    with requests.post(f"{api.url}/v1/chat/completions", json=body, stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {secret}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert any(b'"content"' in line for line in lines)   # the first content chunk came
    # the caller left: the worker aborts at its next chunk, and bills what was produced by then

    def row() -> tuple[str, int, Decimal] | None:
        return db.execute("SELECT outcome, completion_tokens, cost_usd FROM usage WHERE api_key_id = %s",
                          (key_id,)).fetchone()
    wait_until(row, timeout=30)
    outcome, completion, cost = row()
    assert outcome == "client_closed" and 0 < completion < 62 and cost > 0
    wait_until(lambda: mine(api, secret)[b["id"]]["reserved_usd"] == "0", timeout=10)
    assert to_units(Decimal(mine(api, secret)[b["id"]]["spent_usd"])) == to_units(cost)


def test_calls_that_all_find_the_state_gone_rebuild_it_once(api, gateway_env, db, prefix):
    key_id, secret = new_key(gateway_env, "herd")
    b = budget(api, key_id, limit_usd="1")
    known(api, secret)
    assert chat(api, secret).status_code == 200
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.delete(*client.scan_iter(f"{prefix}:budget:{b['id']}:*"))
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: chat(api, secret).status_code, range(20)))
    assert codes == [200] * 20
    wait_until(lambda: usage_units(db, key_id)[0] == 21, timeout=20)
    figures = mine(api, secret)[b["id"]]
    assert to_units(Decimal(figures["spent_usd"])) == usage_units(db, key_id)[1]
    assert figures["reserved_usd"] == "0"


def test_a_wipe_mid_run_neither_double_spends_nor_leaks(api, gateway_env, db, prefix):
    """30 slow calls are running when the budget's Redis state is wiped; 30 more arrive meanwhile (the
    first of them rebuilds it, with the running calls' reservations). When all are done the spent figure
    is exactly the usage rows' sum and nothing is left reserved."""
    key_id, secret = new_key(gateway_env, "midrun")
    b = budget(api, key_id, limit_usd="1")
    known(api, secret)
    slow = {**HI, "messages": [{"role": "user", "content": "sleep:1.5 hi"}]}
    client = redis.Redis.from_url(TEST_REDIS_URL)
    with ThreadPoolExecutor(60) as pool:
        first = [pool.submit(chat, api, secret, slow) for _ in range(30)]
        wait_until(lambda: mine(api, secret)[b["id"]]["reserved_usd"] != "0", timeout=10)
        client.delete(*client.scan_iter(f"{prefix}:budget:{b['id']}:*"))
        second = [pool.submit(chat, api, secret) for _ in range(30)]
        codes = [f.result().status_code for f in first + second]
    assert codes == [200] * 60
    wait_until(lambda: usage_units(db, key_id)[0] == 60, timeout=20)
    figures = mine(api, secret)[b["id"]]
    assert to_units(Decimal(figures["spent_usd"])) == usage_units(db, key_id)[1]
    assert figures["reserved_usd"] == "0"
