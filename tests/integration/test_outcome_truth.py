"""Callers told the truth when Redis fails under them (issue 9.3).

* Redis cut for ~3 s while sync calls run upstream: the API's watch keeps re-reading the job's stream
  with backoff until Redis is back, so every caller gets the answer the upstream gave — none a 500.
* Redis forgets the jobs (their keys deleted, as a wipe would) while sync callers wait on a slow
  upstream: a caller gets its answer or a 503 ``outcome_unknown`` that carries the job id and never
  says "retry it" — never a failure.

The API and its workers reach Redis through a fault proxy (``fault_api``); the test reaches it
directly."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

CALLS = 6


def chat(api, content: str, max_wait: float = 30, model: str = "fake-model") -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", timeout=120,
                         headers={"x-gateway-max-wait": str(max_wait)},
                         json={"model": model, "messages": [{"role": "user", "content": content}]})


def test_sync_calls_survive_a_redis_blip(fault_api, faults, fake):
    """Their max_wait (2 s) passes during the outage: the watch must then read the job's state, fails
    to reach Redis, and reads again with backoff until it can (the jobs had started: they are waited
    for, not withdrawn)."""
    prompts = [f"sleep:5 blip {i}" for i in range(CALLS)]
    with ThreadPoolExecutor(CALLS) as pool:
        calls = [pool.submit(chat, fault_api, prompt, 2) for prompt in prompts]
        wait_until(lambda: fake.stats()["in_flight"] == CALLS, 20)
        faults.redis.cut()
        time.sleep(3)  # the outage itself; what is checked comes after it
        faults.redis.restore()
        answers = [call.result() for call in calls]
    assert [r.status_code for r in answers] == [200] * CALLS, [r.text for r in answers
                                                               if r.status_code != 200]
    for prompt, r in zip(prompts, answers, strict=True):
        assert r.json()["choices"][0]["message"]["content"] == f"echo: {prompt}"
    assert all(fake.stats()["by_content"][prompt] == 1 for prompt in prompts)


def test_callers_whose_job_redis_forgot_are_told_the_outcome_is_unknown(fault_api, faults, fake, prefix):
    """Running calls (fake-model) get their answer or outcome_unknown; calls still queued (stalled-model
    has no worker) can only be told outcome_unknown — their job is gone, nobody can say more."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    running = [("fake-model", f"sleep:2 wiped {i}") for i in range(CALLS)]
    queued = [("stalled-model", f"wiped queued {i}") for i in range(2)]
    with ThreadPoolExecutor(len(running) + len(queued)) as pool:
        calls = [pool.submit(chat, fault_api, prompt, 4, model) for model, prompt in running + queued]
        wait_until(lambda: fake.stats()["in_flight"] == CALLS and len(job_keys(client, prefix)) >= 8, 20)
        assert client.delete(*job_keys(client, prefix)) >= CALLS + len(queued)
        answers = [call.result() for call in calls]
    for r in answers[:CALLS]:
        assert r.status_code == 200 or is_outcome_unknown(r), r.text
    assert all(is_outcome_unknown(r) for r in answers[CALLS:]), [r.text for r in answers[CALLS:]]


def job_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(f"{prefix}:job:*", count=1000))


def is_outcome_unknown(r: requests.Response) -> bool:
    """A 503 outcome_unknown that names its job and suggests no blind retry."""
    if r.status_code != 503:
        return False
    error = r.json()["error"]
    assert error["code"] == "outcome_unknown"
    assert r.headers["x-gateway-job-id"] in error["message"]
    assert "retry it" not in error["message"] and "Retry-After" not in r.headers
    return True
