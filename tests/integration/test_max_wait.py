"""max_wait: past it the caller gets a 429 with Retry-After and the job never reaches the upstream."""

from __future__ import annotations

import time

import pytest
import requests

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration


def test_expired_sync_call_gets_429_and_its_job_never_runs(api, fake, start_worker):
    # nothing consumes llm.stalled yet: the call waits in line for its whole max_wait
    started = time.monotonic()
    r = requests.post(f"{api.url}/v1/chat/completions", headers={"x-gateway-max-wait": "1.5"},
                      json={"model": "stalled-model",
                            "messages": [{"role": "user", "content": "never sent"}]})
    waited = time.monotonic() - started
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "queue_timeout"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["Retry-After"]) >= 1
    assert 1.4 <= waited < 5

    # the body extension works too (openai SDK: extra_body={"max_wait": ...})
    r2 = requests.post(f"{api.url}/v1/chat/completions",
                       json={"model": "stalled-model", "max_wait": 0.5,
                             "messages": [{"role": "user", "content": "never sent either"}]})
    assert r2.status_code == 429

    # a worker that picks the withdrawn jobs up later must not call the upstream
    worker = start_worker("stalled")
    wait_until(lambda: len(worker.finished_tasks()) == 2, 20)  # both messages taken, and their tasks over
    assert fake.stats()["calls"] == 0


def test_call_that_starts_before_its_deadline_is_answered_even_if_it_ends_after(api, fake):
    r = requests.post(f"{api.url}/v1/chat/completions", headers={"x-gateway-max-wait": "1"},
                      json={"model": "fake-model", "messages": [{"role": "user", "content": "sleep:2 slow"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: sleep:2 slow"
