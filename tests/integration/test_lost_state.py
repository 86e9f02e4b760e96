"""Redis forgetting jobs (a restart without persistence): nothing accepted is lost for good.

Simulated by deleting a job's live state and its queue message, as a Redis restart would:

* an async job (durable in Postgres) is queued again by a worker's reconciler and runs exactly once —
  or, if its max_wait passed meanwhile, is marked expired instead of staying ``queued`` forever;
* a sync caller waiting on a forgotten job gets a 503 ``outcome_unknown`` (with its job id) at its
  max_wait at the latest, instead of being held for the whole task time limit.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import WorkerFactory, stop_all, wait_until
from workers.reconciler import GRACE_S

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway_env(gateway_env: dict[str, str]) -> dict[str, str]:
    # the module's own workers reconcile only as they start: what a test sees is its own worker's doing
    return {**gateway_env, "GATEWAY_RECONCILE_INTERVAL": "3600"}


def forget(prefix: str, job_id: str) -> None:
    """What a Redis restart does to a queued job: its live state and its queue message are gone."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    assert client.delete(f"{prefix}:job:{job_id}") == 1
    client.delete(f"{prefix}:llm.stalled")  # the stalled queue holds only messages of settled jobs besides


def job(api, job_id: str) -> dict:
    return requests.get(f"{api.url}/v1/jobs/{job_id}").json()


def test_async_jobs_redis_forgot_are_queued_again_or_expired(api, fake, gateway_env, prefix,
                                                             tmp_path_factory):
    def submit(content: str, max_wait: float) -> str:
        return requests.post(f"{api.url}/v1/jobs", headers={"x-gateway-max-wait": str(max_wait)},
                             json={"model": "stalled-model",
                                   "messages": [{"role": "user", "content": content}]}).json()["id"]
    found, late = submit("lost and found", 50), submit("lost too long", 2)
    forget(prefix, found)
    forget(prefix, late)
    worker = WorkerFactory({**gateway_env, "GATEWAY_RECONCILE_INTERVAL": "1"},
                           tmp_path_factory.mktemp("reconcile")).start("stalled", "reconciler")
    try:
        wait_until(lambda: job(api, found)["status"] == "succeeded", GRACE_S + 30)
        wait_until(lambda: job(api, late)["status"] == "expired", 15)
    finally:
        stop_all([worker])
    assert job(api, found)["result"]["choices"][0]["message"]["content"] == "echo: lost and found"
    assert job(api, late)["error"]["code"] == "queue_timeout"
    # once, although two reconcilers may have run
    assert fake.stats()["by_content"].get("lost and found") == 1
    assert "lost too long" not in fake.stats()["by_content"]
    assert "queued again" in worker.output()


def test_a_sync_caller_waiting_on_a_forgotten_job_is_told_at_its_max_wait(api, prefix):
    client = redis.Redis.from_url(TEST_REDIS_URL)

    def find_job() -> str | None:
        for key in client.scan_iter(f"{prefix}:job:*", count=1000):
            if key.count(b":") == 2 and b"forget me" in (client.hget(key, "spec") or b""):
                return key.decode().rsplit(":", 1)[1]
        return None

    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        call = pool.submit(requests.post, f"{api.url}/v1/chat/completions", timeout=20,
                           headers={"x-gateway-max-wait": "3"},
                           json={"model": "stalled-model",
                                 "messages": [{"role": "user", "content": "forget me"}]})
        wait_until(lambda: find_job() is not None, 5)
        forget(prefix, find_job())
        r = call.result()
    assert r.status_code == 503 and r.json()["error"]["code"] == "outcome_unknown"
    job_id = r.headers["x-gateway-job-id"]
    assert job_id in r.json()["error"]["message"] and "retry it" not in r.json()["error"]["message"]
    assert "Retry-After" not in r.headers  # it may have run: no blind retry is suggested
    assert time.monotonic() - started < 6  # at its max_wait, not after the whole task time limit


def test_a_starting_worker_requeues_lost_jobs_at_once_and_says_so(api, fake, gateway_env, prefix,
                                                                  tmp_path_factory):
    """After a restart the jobs Redis lost run as the first worker starts, not one reconcile
    interval (here an hour) later; the worker says in one warning what it recovered."""
    job_id = requests.post(f"{api.url}/v1/jobs", headers={"x-gateway-max-wait": "60"},
                           json={"model": "stalled-model",
                                 "messages": [{"role": "user", "content": "found at start-up"}]}).json()["id"]
    forget(prefix, job_id)
    time.sleep(GRACE_S)   # older than the reconciler's grace, as any job accepted before a restart is
    worker = WorkerFactory({**gateway_env, "GATEWAY_RECONCILE_INTERVAL": "3600"},
                           tmp_path_factory.mktemp("startup")).start("stalled", "starting")
    try:
        wait_until(lambda: job(api, job_id)["status"] == "succeeded", 15)
    finally:
        stop_all([worker])
    assert fake.stats()["by_content"].get("found at start-up") == 1
    assert "start-up check: 1 accepted async job(s) had lost their place" in worker.output()


def test_an_async_job_whose_message_a_dying_worker_took_is_queued_again(api, fake, gateway_env, prefix,
                                                                        tmp_path_factory):
    """A worker SIGKILLed while Redis's BRPOP reply is on its way takes the message with it: the job's
    live state says ``queued`` (no holder, no attempt) but its message is in neither the queue nor
    kombu's ``unacked`` (bench/faults.py worker-kill found one). The reconciler queues it again."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    body = {"model": "stalled-model", "messages": [{"role": "user", "content": "taken by a dying worker"}]}
    job_id = requests.post(f"{api.url}/v1/jobs", headers={"x-gateway-max-wait": "60"}, json=body).json()["id"]
    assert client.delete(f"{prefix}:llm.stalled") == 1   # the message gone, the live state kept
    time.sleep(GRACE_S)   # older than the reconciler's grace
    logs = tmp_path_factory.mktemp("messageless")
    worker = WorkerFactory(gateway_env, logs).start("stalled", "redeliverer")   # its start-up pass
    try:
        wait_until(lambda: job(api, job_id)["status"] == "succeeded", 15)
    finally:
        stop_all([worker])
    assert fake.stats()["by_content"].get("taken by a dying worker") == 1
    assert "1 accepted async job(s) had lost their queue message" in worker.output()
