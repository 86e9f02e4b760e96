"""Settling never loses a result (issue 9.4), and jobs always have an owner (9.8).

* Async jobs whose work ends while Postgres is cut: their outcomes wait on the outbox (Redis) and
  reach their rows once Postgres is back; reads answer 503 with Retry-After meanwhile, never 500.
* Sync calls whose worker settles while Redis is cut: the worker keeps the answer and settles once
  Redis is back, so the callers get it; each call leaves one usage row.
* A row left open after its job settled (a crash between the two writes) is repaired.
* A job made while auth is open belongs to "anonymous": a key made later cannot see or cancel it.

The outages are real: the workers (and, for Postgres, the API) reach Redis and Postgres through the
TCP proxies of ``tests/faults.py``, which the tests cut and restore.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import redis
import requests

from common.apikeys import ANONYMOUS
from common.contract import JobState
from common.jobs import JobStore
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import Api, FaultProxies, Process, WorkerFactory, kill_all, wait_until
from tests.integration.test_auth import cli

pytestmark = pytest.mark.integration

ASYNC_JOBS = 30
SYNC_CALLS = 10
# redis-py retries a failed command itself for a few seconds (3 tries, jittered backoff): the outage
# outlasts that, so that the settle's own patience is what carries the answers through
REDIS_OUTAGE_AFTER_ANSWERS_S = 7.0


def chat(model: str, text: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def live_state(prefix: str, job_id: str) -> str | None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        state = client.hget(f"{prefix}:job:{job_id}", "state")
    finally:
        client.close()
    return state.decode() if state is not None else None


def statuses(db: psycopg.Connection, ids: list[str]) -> dict[str, str]:
    return dict(db.execute("SELECT id, status FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall())


def usage_rows(db: psycopg.Connection, ids: list[str]) -> list[tuple[str, str, str]]:
    return db.execute("SELECT job_id, outcome, api_key_id FROM usage WHERE job_id = ANY(%s) ORDER BY job_id",
                      (ids,)).fetchall()


def test_async_jobs_settled_while_postgres_is_down_reach_their_rows_when_it_is_back(
        fault_api, faults, fake, db, prefix):
    ids = [requests.post(f"{fault_api.url}/v1/jobs", json=chat("fake-model", f"sleep:2.5 outbox {i}"),
                         timeout=30).json()["id"] for i in range(ASYNC_JOBS)]
    wait_until(lambda: "queued" not in statuses(db, ids).values(), 30, interval=0.1)
    faults.postgres.cut()
    cut_at = time.monotonic()
    try:
        # (read past the proxy:) the jobs whose work will end during the outage — nearly all of them
        running = [job_id for job_id, status in statuses(db, ids).items() if status == "running"]
        assert len(running) >= ASYNC_JOBS // 2, statuses(db, ids)
        read = requests.get(f"{fault_api.url}/v1/jobs/{ids[0]}", timeout=30)
        assert read.status_code == 503 and read.headers["Retry-After"], read.text
        assert read.json()["error"]["code"] == "database_unavailable"
        # every job's work ends during the outage: its live state settles, its row cannot
        wait_until(lambda: all(live_state(prefix, job_id) == "succeeded" for job_id in ids), 30, interval=0.2)
        assert set(statuses(db, running).values()) == {"running"}  # settled in Redis only
        reads = [requests.get(f"{fault_api.url}/v1/jobs/{job_id}", timeout=30) for job_id in ids[:5]]
        assert {r.status_code for r in reads} == {503} and all(r.headers["Retry-After"] for r in reads)
        time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))  # the outage lasts ~10 s in all
    finally:
        faults.postgres.restore()
    wait_until(lambda: set(statuses(db, ids).values()) == {"succeeded"}, 20, interval=0.2)
    rows = usage_rows(db, ids)
    assert [job_id for job_id, _, _ in rows] == sorted(ids)  # exactly one usage row per job ...
    assert {(outcome, owner) for _, outcome, owner in rows} == {("success", ANONYMOUS)}  # ... billed
    results = db.execute("SELECT result->'choices'->0->'message'->>'content', usage->>'cost_usd', "
                         "finished_at FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()
    assert all(content.startswith("echo: sleep:2.5 outbox") and cost and finished
               for content, cost, finished in results), results
    answer = requests.get(f"{fault_api.url}/v1/jobs/{ids[0]}", timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
    assert fake.stats()["calls"] == ASYNC_JOBS  # nothing ran twice
    log = fault_api.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def direct_api(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """An API that reaches Redis and Postgres directly (only the workers go through the proxies)."""
    server = Api(gateway_env, tmp_path_factory.mktemp("direct-api") / "api.log").start()
    yield server
    server.kill()


@pytest.fixture
def crashy_worker(faults: FaultProxies, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A worker on ``llm.crashy`` that reaches Redis and Postgres through the fault proxies (with the
    default-sized visibility timeout and lease: the outage must not pass for a dead worker's)."""
    env = {**faults.env, "GATEWAY_VISIBILITY_TIMEOUT": "120"}
    proc = WorkerFactory(env, tmp_path_factory.mktemp("crashy-logs")).start("crashy", "crashy-proxied")
    yield proc
    kill_all([proc])


def test_sync_calls_settled_while_redis_is_down_are_answered_when_it_is_back(
        direct_api, crashy_worker, faults, fake, db):
    def call(i: int) -> requests.Response:
        return requests.post(f"{direct_api.url}/v1/chat/completions", timeout=60,
                             json=chat("crashy-model", f"sleep:3 blip {i}"))

    with ThreadPoolExecutor(SYNC_CALLS) as pool:
        futures = [pool.submit(call, i) for i in range(SYNC_CALLS)]
        wait_until(lambda: fake.stats()["calls"] == SYNC_CALLS, 20, interval=0.05)
        faults.redis.cut()  # the upstream answers within ~3 s, while the workers cannot reach Redis
        try:
            wait_until(lambda: fake.stats()["in_flight"] == 0, 20, interval=0.05)
            time.sleep(REDIS_OUTAGE_AFTER_ANSWERS_S)
        finally:
            faults.redis.restore()
        replies = [future.result() for future in futures]
    assert [r.status_code for r in replies] == [200] * SYNC_CALLS, [r.text for r in replies]
    assert sorted(r.json()["choices"][0]["message"]["content"] for r in replies) == sorted(
        f"echo: sleep:3 blip {i}" for i in range(SYNC_CALLS))
    ids = [r.headers["x-gateway-job-id"] for r in replies]
    wait_until(lambda: len(usage_rows(db, ids)) >= SYNC_CALLS, 20, interval=0.2)
    rows = usage_rows(db, ids)
    assert [job_id for job_id, _, _ in rows] == sorted(ids)
    assert {(outcome, owner) for _, outcome, owner in rows} == {("success", ANONYMOUS)}
    assert fake.stats()["calls"] == SYNC_CALLS


def test_a_job_made_while_auth_is_open_is_not_a_later_keys(gateway_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("owner")
    server = Api({**gateway_env, "GATEWAY_AUTH": "auto"}, logs / "api.log").start()
    try:
        job = requests.post(f"{server.url}/v1/jobs", json=chat("stalled-model", "whose?"), timeout=30).json()
        url = f"{server.url}/v1/jobs/{job['id']}"
        assert requests.get(url, timeout=30).status_code == 200  # auth is open: anonymous reads its own
        secret = cli(gateway_env, "keys", "create", "--name", "later").strip().splitlines()[-1]
        key = {"Authorization": f"Bearer {secret}"}
        # within the key cache's few seconds, auth closes: the key is no owner of anonymous's job
        wait_until(lambda: requests.get(url, headers=key, timeout=30).status_code == 404, 15, interval=0.2)
        gone = requests.delete(url, headers=key, timeout=30)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"
        assert requests.get(url, timeout=30).status_code == 401
    finally:
        server.kill()


def test_a_row_left_open_after_its_job_settled_is_repaired(direct_api, gateway_env, prefix, db,
                                                           tmp_path_factory):
    """The API withdrew a queued job (the real Lua step) and died before cancelling its row: the
    reconciler settles the row into the live state."""
    job_id = requests.post(f"{direct_api.url}/v1/jobs", json=chat("stalled-model", "orphan"),
                           timeout=30).json()["id"]
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        assert JobStore(client, prefix).withdraw(job_id, JobState.CANCELLED) is JobState.CANCELLED
    finally:
        client.close()
    assert statuses(db, [job_id]) == {job_id: "queued"}
    env = {**gateway_env, "GATEWAY_RECONCILE_INTERVAL": "1"}
    worker = WorkerFactory(env, tmp_path_factory.mktemp("repair-logs")).start("leasy", "reconciling")
    try:
        wait_until(lambda: statuses(db, [job_id]) == {job_id: "cancelled"}, 30, interval=0.2)
        assert f"job {job_id}: its row said queued after the job had cancelled; repaired" in worker.output()
    finally:
        kill_all([worker])
