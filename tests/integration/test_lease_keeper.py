"""The worker's lease keeper (workers/leases.py LeaseKeeper) in the real Redis: one thread renews every
running job's lease in one round trip per tick, stops at release, and never renews a lease another
execution holds."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
import redis

from common.jobs import JobStore
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import delete_prefix, wait_until
from workers.leases import LeaseKeeper

pytestmark = pytest.mark.integration

TTL_S = 0.6


@pytest.fixture
def store() -> Iterator[JobStore]:
    prefix = "gwkeep" + secrets.token_hex(4)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    yield JobStore(client, prefix)
    client.close()
    delete_prefix(prefix)


def lease(store: JobStore, job_id: str, execution: str) -> None:
    store.redis.set(store.lease_key(job_id), execution, px=int(TTL_S * 1000))   # as the claim sets it


def test_held_leases_outlive_their_ttl_and_lapse_once_released(store):
    keeper = LeaseKeeper(store, TTL_S)
    permits: list[str] = []
    for job_id in ("a", "b"):
        lease(store, job_id, f"exec-{job_id}")
        keeper.hold(job_id, f"exec-{job_id}", renew_permit=lambda j=job_id: permits.append(j))
    time.sleep(3 * TTL_S)
    assert all(store.redis.exists(store.lease_key(j)) for j in ("a", "b"))   # renewed, every third
    assert permits.count("a") >= 3 and permits.count("b") >= 3               # with their permits
    keeper.release("a", "exec-a")
    wait_until(lambda: not store.redis.exists(store.lease_key("a")), 3 * TTL_S)
    assert store.redis.exists(store.lease_key("b"))
    keeper.stop()


def test_a_lease_taken_over_by_another_execution_is_left_alone(store):
    keeper = LeaseKeeper(store, TTL_S)
    permits: list[str] = []
    lease(store, "j", "mine")
    keeper.hold("j", "mine", renew_permit=lambda: permits.append("j"))
    store.redis.set(store.lease_key("j"), "theirs", px=int(TTL_S * 1000))   # e.g. the job was taken over
    keeper.renew()
    assert permits == [] and store.redis.get(store.lease_key("j")) == b"theirs"
    wait_until(lambda: not store.redis.exists(store.lease_key("j")), 3 * TTL_S)   # nobody renews theirs
    keeper.release("j", "mine")   # a release after the keeper let go is harmless
    keeper.stop()


def test_a_release_by_an_older_execution_keeps_the_newer_ones_lease(store):
    keeper = LeaseKeeper(store, TTL_S)
    lease(store, "j", "new")
    keeper.hold("j", "new", renew_permit=lambda: None)
    keeper.release("j", "old")
    time.sleep(3 * TTL_S)
    assert store.redis.get(store.lease_key("j")) == b"new"
    keeper.stop()
