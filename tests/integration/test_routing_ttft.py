"""The shared time-to-first-token averages (common/routing/ttft.py, common/lua/ttft.lua) on the real
Redis: the decaying average, its fading during silence, stale and missing fields, the bounded key, and
a Redis outage that drops a sample without failing the caller."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
import redis

from common.routing.ttft import ALPHA, HALF_LIFE_S, MAX_AGE_S, RedisLatencyStats
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import delete_prefix, free_port


@pytest.fixture
def stats() -> Iterator[RedisLatencyStats]:
    prefix = "gwtest" + secrets.token_hex(4)
    yield RedisLatencyStats(redis.Redis.from_url(TEST_REDIS_URL), prefix)
    delete_prefix(prefix)


def test_first_sample_then_a_decaying_average(stats):
    assert stats.ttft_ms("a") is None
    stats.observe("a", 100)
    assert stats.ttft_ms("a") == pytest.approx(100)
    stats.observe("a", 500)
    assert stats.ttft_ms("a") == pytest.approx((1 - ALPHA) * 100 + ALPHA * 500, rel=0.01)


def test_an_old_average_fades_during_silence(stats):
    now = time.time()
    stats.redis.hset(stats.key, "a", f"1000 {now - HALF_LIFE_S:.3f}")  # last fed one half-life ago
    stats.observe("a", 0)
    keep = (1 - ALPHA) * 0.5
    assert stats.ttft_ms("a") == pytest.approx(keep * 1000, rel=0.02)


def test_snapshot_reads_many_leaves_out_missing_stale_and_garbled(stats):
    now = time.time()
    stats.redis.hset(stats.key, mapping={"fresh": f"40 {now:.3f}", "stale": f"10 {now - MAX_AGE_S - 5:.3f}",
                                         "garbled": "fast"})
    snap = stats.snapshot(["fresh", "stale", "garbled", "never"])
    assert dict(snap.ms) == {"fresh": pytest.approx(40)}


def test_one_key_with_one_field_per_alias_that_expires(stats):
    for alias in ("a", "b", "a", "c", "b"):
        stats.observe(alias, 10)
    assert stats.redis.hlen(stats.key) == 3
    assert [k for k in stats.redis.scan_iter(f"{stats.key.rsplit(':', 2)[0]}:*")] == [stats.key.encode()]
    assert 0 < stats.redis.ttl(stats.key) <= MAX_AGE_S


def test_redis_down_drops_the_sample_without_raising():
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    RedisLatencyStats(client, "gwtest-down").observe("a", 10)  # logged once, never raised
