"""The circuit breaker's state machine in the real Redis (common/lua/breaker.lua via
common/routing/breaker.py): closed → open → half-open with bounded probes → closed or open again."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from common.lua import ScriptBatch
from common.registry import BreakerSettings
from common.routing import BreakerState
from common.routing.breaker import Breakers, ClosedMemo, Gate, Verdict, read_load, state_of
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



def test_a_report_answers_the_state_it_left_the_breaker_in(breakers):
    assert breakers.report("p/m", Verdict.OK, probe=False, latency_ms=5) == "closed"
    assert [breakers.report("p/m", Verdict.FAIL, probe=False, latency_ms=5) for _ in range(3)] == [
        "closed", "closed", "open"]   # the third failure opened it
    assert breakers.report("p/m", Verdict.OK, probe=False, latency_ms=5) == "open"   # a straggler's success
    wait_until(lambda: breakers.admit("p/m").gate is Gate.PROBE, 5)
    assert breakers.report("p/m", Verdict.OK, probe=True, latency_ms=5) == "closed"   # the probe closed it
    assert breakers.report("p/m", Verdict.MISCONFIGURED, probe=False, latency_ms=5) == "open"


def test_a_report_batched_with_other_commands_is_the_same_report(breakers):
    batch = ScriptBatch(breakers.redis)
    batch.pipe.set(breakers.key("other"), "x")
    index = breakers.report_in(batch, "p/m", Verdict.OK, probe=False, latency_ms=70)
    replies = batch.execute()
    assert state_of(replies[index]) == "closed" and replies[0] is True
    assert load(breakers).latency_ms == 70.0


def test_a_batched_script_redis_does_not_know_yet_is_loaded_and_run(breakers):
    # a script never loaded (as after a Redis restart): its EVALSHA fails, the batch runs it again
    fresh = breakers.redis.register_script(f"-- {secrets.token_hex(8)}\nreturn redis.call('INCR', KEYS[1])")
    batch = ScriptBatch(breakers.redis)
    first = batch.script(fresh, [breakers.key("n")], [])
    batch.pipe.incr(breakers.key("n"))
    second = batch.script(fresh, [breakers.key("n")], [])
    replies = batch.execute()
    assert (replies[first], replies[1], replies[second]) == (2, 1, 3)   # each ran once, the lost ones last
    assert int(breakers.redis.get(breakers.key("n"))) == 3


def test_a_worker_that_heard_closed_sees_another_process_open_it_within_the_bound(breakers):
    memo = ClosedMemo(OPEN_S / 3)
    asked = memo.clock()
    memo.heard("p/m", Verdict.OK, breakers.report("p/m", Verdict.OK, probe=False, latency_ms=5), asked=asked)
    assert memo.closed("p/m")
    fail(breakers, 3)   # another process's failures open it
    assert breakers.admit("p/m").gate is Gate.OPEN
    wait_until(lambda: not memo.closed("p/m"), OPEN_S)   # ... and this one asks Redis again soon
