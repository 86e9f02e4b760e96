"""Provider limits held across two real worker processes; waiting in line instead of 429s."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration


def chat(api, model: str, content: str, max_wait: float = 30, **extra) -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", headers={"x-gateway-max-wait": str(max_wait)},
                         json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def limits(api, provider: str) -> dict:
    return requests.get(f"{api.url}/v1/limits").json()["providers"][provider]


def test_burst_above_concurrency_waits_in_line_and_never_exceeds_it(api, fake, start_worker):
    start_worker("limited")
    start_worker("limited")
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda i: chat(api, "limited-model", f"sleep:0.3 burst {i}"), range(12)))
    assert [r.status_code for r in replies] == [200] * 12
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == [
        f"echo: sleep:0.3 burst {i}" for i in range(12)]
    stats = fake.stats()
    assert stats["concurrent_max"] == 2  # the limit, reached and never exceeded, across both workers
    assert stats["by_status"] == {"200": 12}
    waits = sorted(int(r.headers["x-gateway-queue-wait-ms"]) for r in replies)
    assert waits[-1] >= 1000  # the last ones really waited their turn (5 rounds of 0.3 s ahead)
    snapshot = limits(api, "limited")
    assert snapshot["scopes"]["limited"]["limits"]["concurrency"] == 2
    assert snapshot["scopes"]["limited"]["in_flight"] == 0 and snapshot["waiting_in_line"] == 0


def test_call_expiring_in_line_gets_429_and_never_reaches_upstream(api, fake, start_worker):
    worker = start_worker("limited")
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(chat, api, "limited-model", f"sleep:2.5 hog {i}") for i in range(2)]
        wait_until(lambda: fake.stats()["in_flight"] == 2, 10)
        waiting = pool.submit(chat, api, "limited-model", "too late", 1.0)
        r = waiting.result()
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_timeout"
        assert int(r.headers["Retry-After"]) >= 1
        assert all(f.result().status_code == 200 for f in busy)
    wait_until(lambda: len(worker.finished_tasks()) == 3, 10)  # the late one's task is over too
    assert "too late" not in fake.stats()["by_content"]
    assert limits(api, "limited")["waiting_in_line"] == 0


def test_killed_workers_concurrency_lease_returns_within_its_ttl(api, fake, start_worker):
    doomed = start_worker("leasy")  # concurrency 1; its own provider, as the killed job comes back later
    with ThreadPoolExecutor(2) as pool:
        pool.submit(requests.post, f"{api.url}/v1/chat/completions", timeout=2,
                    json={"model": "leasy-model",
                          "messages": [{"role": "user", "content": "sleep:15 hog the slot"}]})
        wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
        doomed.kill()
        start_worker("leasy")
        started = time.monotonic()
        r = chat(api, "leasy-model", "after the crash", 20)
        assert r.status_code == 200, r.text
        # the dead worker's permit lapsed (lease TTL = visibility timeout / 3 ≈ 3.3 s) and the
        # waiting head noticed: far sooner than the hogging call would have ended
        assert time.monotonic() - started < 10


def test_tpm_is_reserved_before_and_settled_after_each_call(api, fake, start_worker):
    start_worker("metered")
    r = chat(api, "metered-model", "count me", max_tokens=100)
    assert r.status_code == 200
    # reserved ~ 100 + prompt estimate, settled to the real usage: 2 prompt + 3 completion tokens
    assert limits(api, "metered")["scopes"]["metered"]["tokens_last_60s"] == 5

    # 3 calls reserving ~160 tokens each cannot all fit in 400 - 5 at once: the third waits for a settle
    # (1.5 s each: the first two overlap even when a loaded machine is slow to dispatch the second)
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda i: chat(api, "metered-model", f"sleep:1.5 t{i}", max_tokens=150),
                                range(3)))
    assert [x.status_code for x in replies] == [200] * 3
    # never all three at once (how many of the two that fit overlapped depends on the machine's load)
    assert fake.stats()["concurrent_max"] <= 2
    assert limits(api, "metered")["scopes"]["metered"]["tokens_last_60s"] == 5 + 3 * 5


def test_request_larger_than_tpm_fails_fast(api, fake, start_worker):
    start_worker("metered")
    r = chat(api, "metered-model", "huge", max_tokens=5000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_exceeds_tpm"
    assert fake.stats()["calls"] == 0


def test_upstream_429_cools_down_every_worker_and_the_job_keeps_its_place(api, fake, start_worker):
    start_worker("limited")
    start_worker("limited")
    fake.configure(fail_next={"count": 1, "status": 429, "retry_after": 1})
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: chat(api, "limited-model", f"cool {i}"), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    # one 429 put the provider in a shared cooldown: nobody else hit the upstream during it
    assert fake.stats()["by_status"] == {"429": 1, "200": 4}


def test_queued_async_job_shows_its_place_in_line(api, fake, start_worker):
    start_worker("fair")
    hog = requests.post(f"{api.url}/v1/jobs", json={
        "model": "fair-model", "messages": [{"role": "user", "content": "sleep:2 first"}]}).json()
    wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
    second = requests.post(f"{api.url}/v1/jobs", json={
        "model": "fair-model", "messages": [{"role": "user", "content": "second"}]}).json()

    def in_line() -> bool:
        job = requests.get(f"{api.url}/v1/jobs/{second['id']}").json()
        return job["status"] == "queued" and job["queue"]["position"] == 0
    wait_until(in_line, 5)
    wait_until(lambda: requests.get(f"{api.url}/v1/jobs/{second['id']}").json()["status"] == "succeeded", 10)
    assert requests.get(f"{api.url}/v1/jobs/{hog['id']}").json()["status"] == "succeeded"


def test_cancelled_head_of_the_line_hands_its_turn_on_at_once(api, fake, start_worker):
    start_worker("fair")  # concurrency 1
    with ThreadPoolExecutor(2) as pool:
        hog = pool.submit(chat, api, "fair-model", "sleep:1.5 hog")
        wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
        head = requests.post(f"{api.url}/v1/jobs", json={
            "model": "fair-model", "messages": [{"role": "user", "content": "cancel me"}]}).json()
        wait_until(lambda: limits(api, "fair")["waiting_in_line"] == 1, 5)
        started = time.monotonic()
        behind = pool.submit(chat, api, "fair-model", "behind")
        wait_until(lambda: limits(api, "fair")["waiting_in_line"] == 2, 5)
        assert requests.delete(f"{api.url}/v1/jobs/{head['id']}").json()["status"] == "cancelled"
        assert hog.result().status_code == 200
        r = behind.result()
        # it started when the hog ended: nobody waited for a re-check timer (5 s) to notice the cancel
        assert r.status_code == 200 and time.monotonic() - started < 3.5
    assert "cancel me" not in fake.stats()["by_content"]
    assert limits(api, "fair")["waiting_in_line"] == 0
