"""A held sync call whose queue message a dying worker took along still gets its answer.

A worker SIGKILLed at the instant Redis answers its BRPOP takes the message with it (kombu had not
recorded it in ``unacked`` yet): the job stays ``queued``, never claimed, its message nowhere. Sync
jobs live in Redis only, so the API process holding the caller looks after them (``api/redeliver.py``):
simulated here by removing the message from the queue before any worker took it (LREM — what the
lost BRPOP reply did), with no worker for the provider until then.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from api.redeliver import GRACE_S, PASS_EVERY_S
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

SLACK_S = 10.0   # a worker's start, the call itself, a busy shared machine


def call(api, model: str, content: str, max_wait: float = 40) -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", headers={"x-gateway-max-wait": str(max_wait)},
                         json={"model": model, "messages": [{"role": "user", "content": content}]},
                         timeout=max_wait + 30)


def job_ids(entries: list[bytes]) -> list[str]:
    """The job ids of broker messages (queue list entries or ``unacked`` values)."""
    messages = [json.loads(entry) for entry in entries]
    # an ``unacked`` value is kombu's [message, exchange, routing key]
    return [(message[0] if isinstance(message, list) else message)["headers"]["id"] for message in messages]


def take_message(client: redis.Redis, queue: str) -> str:
    """Wait for the one message on ``queue`` and remove it, as a worker's lost BRPOP reply did;
    returns its job id."""
    wait_until(lambda: client.llen(queue) == 1, 10)
    entry = client.lindex(queue, 0)
    assert entry is not None and client.lrem(queue, 1, entry) == 1
    return job_ids([entry])[0]


def test_a_held_call_whose_message_was_lost_is_answered_exactly_once(api, fake, prefix, start_worker):
    client = redis.Redis.from_url(TEST_REDIS_URL)
    queue = f"{prefix}:llm.stalled"
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call, api, "stalled-model", "taken by a dying worker's BRPOP")
        job_id = take_message(client, queue)
        start_worker("stalled")
        response = answer.result()
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].endswith("taken by a dying worker's BRPOP")
    assert fake.stats()["by_content"].get("taken by a dying worker's BRPOP") == 1
    assert took < GRACE_S + PASS_EVERY_S + SLACK_S, took
    assert job_id in api.process.output()   # the API says which call it queued again


def test_calls_waiting_in_the_queue_or_in_a_line_are_never_queued_again(api, fake, prefix, start_worker):
    """Three held calls, all past the grace when one pass looks at them: one waits in the broker queue,
    one in a limited provider's line (its message in ``unacked``, its job naming its holder), one lost
    its message. When the lost one's message is back, the same pass judged the other two: each still
    has exactly one message."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    stalled, fair, unacked = f"{prefix}:llm.stalled", f"{prefix}:llm.fair", f"{prefix}:unacked"
    start_worker("fair")   # concurrency 1: the first call holds the slot, the second waits in line
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(call, api, "fair-model", "sleep:25 holds the only slot")
        wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
        in_line = pool.submit(call, api, "fair-model", "waits in line")
        wait_until(lambda: requests.get(f"{api.url}/v1/limits").json()["providers"]["fair"]
                   ["waiting_in_line"] == 1, 10)
        in_queue = pool.submit(call, api, "stalled-model", "waits in the queue")
        wait_until(lambda: client.llen(stalled) == 1, 10)
        queued_id = job_ids([client.lindex(stalled, 0) or b""])[0]
        lost = pool.submit(call, api, "stalled-model", "lost its message")
        wait_until(lambda: client.llen(stalled) == 2, 10)
        lost_entry = client.lindex(stalled, 0)   # LPUSHed: the newest is at the head
        assert lost_entry is not None and client.lrem(stalled, 1, lost_entry) == 1
        lost_id = job_ids([lost_entry])[0]
        assert lost_id != queued_id

        wait_until(lambda: lost_id in job_ids(client.lrange(stalled, 0, -1)),
                   GRACE_S + PASS_EVERY_S + SLACK_S)
        assert sorted(job_ids(client.lrange(stalled, 0, -1))) == sorted([queued_id, lost_id])
        assert client.llen(fair) == 0
        assert len(job_ids(client.hvals(unacked))) == 2   # the running call's and the one in line
        assert not running.done() and not in_line.done()

        start_worker("stalled")
        for future in (in_queue, lost, running, in_line):
            assert future.result().status_code == 200
    stats = fake.stats()["by_content"]
    for content in ("sleep:25 holds the only slot", "waits in line", "waits in the queue",
                    "lost its message"):
        assert stats.get(content) == 1, (content, stats)
