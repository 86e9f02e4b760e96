"""A burst of jobs onto one wide gevent worker: every message delivered, run once and acked.

kombu's Redis transport used a connection pool that raises when more than 10 greenlets need a broker
connection at once; a delivery whose bookkeeping write failed lost its message after BRPOP had taken
it (``workers/kombu_tuning.py``). Hundreds of jobs finishing together reproduce the crowd.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

JOBS = 300


def test_hundreds_of_jobs_at_once_on_one_worker_are_all_delivered_run_and_acked(api, fake, start_worker,
                                                                                prefix):
    worker = start_worker("wide")  # 400 greenlets

    def submit(i: int) -> str:
        r = requests.post(f"{api.url}/v1/jobs", json={
            "model": "wide-model", "messages": [{"role": "user", "content": f"sleep:2 w{i}"}]})
        assert r.status_code == 202
        return str(r.json()["id"])
    # submitted from 16 threads, each job 2 s long: they overlap by the hundred even on a loaded machine
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(JOBS)))

    def statuses() -> list[str]:
        return [requests.get(f"{api.url}/v1/jobs/{job_id}").json()["status"] for job_id in ids]
    wait_until(lambda: set(statuses()) == {"succeeded"}, 60, interval=1)
    assert fake.stats()["concurrent_max"] > 50  # they really ran together
    assert fake.stats()["by_content"] == {f"sleep:2 w{i}": 1 for i in range(JOBS)}  # each exactly once
    client = redis.Redis.from_url(TEST_REDIS_URL)
    wait_until(lambda: client.hlen(f"{prefix}:unacked") == 0, 10)  # every message acked
    assert "Couldn't ack" not in worker.output() and "MaxConnectionsError" not in worker.output()


def test_more_greenlets_than_broker_connections_wait_for_one_instead_of_failing(prefix):
    """The property the worker relies on, at a scale that shows it every time: 12 threads need the
    broker at once through a channel allowed 2 connections; each waits its turn (kombu's own pool
    raised MaxConnectionsError for 10 of them — for a delivery, that lost the message)."""
    from concurrent.futures import ThreadPoolExecutor

    from kombu import Connection

    from workers import kombu_tuning

    kombu_tuning.install()
    with Connection(TEST_REDIS_URL, transport_options={"max_connections": 2,
                                                       "global_keyprefix": f"{prefix}:"}) as conn:
        channel = conn.default_channel

        def hold_a_connection(i: int) -> int:
            with channel.conn_or_acquire() as client:
                client.execute_command("BLPOP", f"{prefix}:nothing-{i}", 0.2)  # holds its connection 0.2 s
                return i

        with ThreadPoolExecutor(12) as pool:
            assert sorted(pool.map(hold_a_connection, range(12))) == list(range(12))
