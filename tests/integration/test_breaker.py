"""The circuit breaker's state machine in the real Redis (common/lua/breaker.lua via
common/routing/breaker.py): closed → open → half-open with bounded probes → closed or open again."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from common.registry import BreakerSettings
from common.routing import BreakerState
from common.routing.breaker import Breakers, Gate, Verdict, read_load
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import delete_prefix, wait_until

pytestmark = pytest.mark.integration

OPEN_S = 0.3


@pytest.fixture
def breakers() -> Iterator[Breakers]:
    prefix = "gwbrk" + secrets.token_hex(4)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    yield Breakers(client, prefix, BreakerSettings(failures=3, window_s=30, open_s=OPEN_S,
                                                   misconfigured_open_s=60, probes=2))
    client.close()
    delete_prefix(prefix)


def fail(b: Breakers, n: int = 1, *, probe: bool = False) -> None:
    for _ in range(n):
        b.report("p/m", Verdict.FAIL, probe=probe, latency_ms=5)


def load(b: Breakers):
    seconds, micros = b.redis.time()
    return read_load(b.redis.hgetall(b.key("p/m")), int(seconds) * 1000 + int(micros) // 1000, 2)


def test_it_opens_after_the_threshold_and_refuses_calls(breakers):
    fail(breakers, 2)
    assert breakers.admit("p/m").gate is Gate.CALL
    fail(breakers)
    admission = breakers.admit("p/m")
    assert admission.gate is Gate.OPEN and 0 < admission.wait_s <= OPEN_S
    assert load(breakers).breaker is BreakerState.OPEN


def test_half_open_lets_a_bounded_number_of_probes_through(breakers):
    fail(breakers, 3)
    wait_until(lambda: load(breakers).breaker is BreakerState.HALF_OPEN, 5)
    gates = [breakers.admit("p/m").gate for _ in range(4)]
    assert gates == [Gate.PROBE, Gate.PROBE, Gate.OPEN, Gate.OPEN]
    assert load(breakers).probe_free is False


def test_a_good_probe_closes_it_and_a_bad_one_opens_it_again(breakers):
    fail(breakers, 3)
    wait_until(lambda: breakers.admit("p/m").gate is Gate.PROBE, 5)
    fail(breakers, probe=True)
    assert breakers.admit("p/m").gate is Gate.OPEN and load(breakers).reason == "failures"
    wait_until(lambda: breakers.admit("p/m").gate is Gate.PROBE, 5)
    breakers.report("p/m", Verdict.OK, probe=True, latency_ms=40)
    assert breakers.admit("p/m").gate is Gate.CALL
    state = load(breakers)
    assert state.breaker is BreakerState.CLOSED and state.latency_ms == 40.0


def test_a_call_begun_before_it_opened_does_not_reopen_it(breakers):
    fail(breakers, 3)
    opened = breakers.redis.hget(breakers.key("p/m"), "until")
    fail(breakers)   # not a probe: a straggler
    assert breakers.redis.hget(breakers.key("p/m"), "until") == opened


def test_misconfigured_opens_it_at_once_for_longer(breakers):
    breakers.report("p/m", Verdict.MISCONFIGURED, probe=False, latency_ms=5)
    state = load(breakers)
    assert state.breaker is BreakerState.OPEN and state.reason == "misconfigured" and state.reopens_in_s > 50


def test_neutral_outcomes_neither_count_nor_reset(breakers):
    fail(breakers, 2)
    for _ in range(5):
        breakers.report("p/m", Verdict.NEUTRAL, probe=False, latency_ms=5)
    fail(breakers)
    assert breakers.admit("p/m").gate is Gate.OPEN


def test_the_error_rate_decays_towards_recent_outcomes(breakers):
    fail(breakers, 2)
    high = load(breakers).error_rate
    for _ in range(10):
        breakers.report("p/m", Verdict.OK, probe=False, latency_ms=5)
    low = load(breakers).error_rate
    assert high is not None and low is not None and low < 0.15 < high

