"""A worker's view of revoked keys: refreshed when the change counter moves (read at most every
CHECK_SECONDS), the last set kept through Redis or Postgres outages, one log line per outage."""

from __future__ import annotations

import logging

import pytest
import redis

from common.revoked import CHECK_SECONDS, RELOAD_SECONDS, RevokedKeys


class Source:
    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.version: str | None = None
        self.down = False
        self.loads = 0

    def load(self) -> set[str]:
        self.loads += 1
        return set(self.ids)

    def read_version(self) -> str | None:
        if self.down:
            raise redis.ConnectionError("refused")
        return self.version


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    source, clock = Source(), Clock()
    return source, clock, RevokedKeys(source.load, source.read_version, clock=clock)


def test_a_revoke_is_seen_at_the_next_check(setup):
    source, clock, revoked = setup
    assert not revoked("key_1") and not revoked(None)
    source.ids, source.version = {"key_1"}, "1"
    assert not revoked("key_1")          # within one check period
    clock.now += CHECK_SECONDS
    assert revoked("key_1")


def test_an_unmoved_counter_costs_no_reload(setup):
    source, clock, revoked = setup
    revoked("key_1")
    loads = source.loads
    for _ in range(100):
        clock.now += CHECK_SECONDS
        revoked("key_1")
    assert source.loads - loads <= 100 * CHECK_SECONDS / RELOAD_SECONDS + 1


def test_an_outage_keeps_the_last_set_and_logs_once(setup, caplog):
    source, clock, revoked = setup
    source.ids, source.version = {"key_1"}, "1"
    revoked("key_1")
    source.down = True
    caplog.set_level(logging.WARNING, logger="common.revoked")
    for _ in range(20):
        clock.now += CHECK_SECONDS
        assert revoked("key_1")
    source.down = False
    clock.now += CHECK_SECONDS
    revoked("key_1")
    assert [r.getMessage() for r in caplog.records] == [
        "revoked API keys not refreshed (ConnectionError); the last set loaded answers",
        "revoked API keys refreshed again"]
