"""The authenticator through a Postgres outage: the last good key set for a bounded time, then 503;
one log line when the outage starts and one when it ends; no reload storm."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy.exc

from api.auth import OUTAGE_RETRY_SECONDS, Authenticator
from common.apikeys import hash_secret
from common.errors import AuthenticationFailed, StoreUnavailable

KEY = "sk-gw-good"
KEYS = {hash_secret(KEY): "key_1"}


class Store:
    """The key loader: answers ``keys``, or raises what SQLAlchemy raises when Postgres is gone."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys
        self.down = False
        self.loads = 0

    def __call__(self) -> dict[str, str]:
        self.loads += 1
        if self.down:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, ConnectionRefusedError("refused"))
        return dict(self.keys)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def setup():
    store, clock = Store(KEYS), Clock()
    return store, clock, Authenticator("auto", store, stale_limit=300, clock=clock)


def test_outage_serves_the_last_set_until_the_stale_limit_then_503(setup, caplog):
    store, clock, auth = setup
    assert auth.authenticate(bearer(KEY)) == "key_1"
    store.down = True
    caplog.set_level(logging.WARNING, logger="api.auth")
    for step in range(0, 290, 10):
        clock.now += 10
        assert auth.authenticate(bearer(KEY)) == "key_1", step
        with pytest.raises(AuthenticationFailed):
            auth.authenticate(bearer("sk-gw-unknown"))
    clock.now += 20  # 310 s after the last good load
    with pytest.raises(StoreUnavailable) as err:
        auth.authenticate(bearer(KEY))
    assert err.value.status == 503 and err.value.retry_after
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "unreachable" in messages[0] and "503" in messages[1]

    store.down = False
    clock.now += OUTAGE_RETRY_SECONDS
    assert auth.authenticate(bearer(KEY)) == "key_1"
    assert "reachable again" in caplog.records[-1].getMessage() and len(caplog.records) == 3


def test_reloads_during_an_outage_are_rate_limited(setup):
    store, clock, auth = setup
    auth.authenticate(bearer(KEY))
    store.down = True
    clock.now += 10
    before = store.loads
    for _ in range(1000):  # a burst of calls within one retry interval: one reload attempt
        auth.authenticate(bearer(KEY))
        with pytest.raises(AuthenticationFailed):
            auth.authenticate(bearer("sk-gw-unknown"))
    assert store.loads - before == 1


def test_no_set_ever_loaded_is_503_not_open():
    store, clock = Store({}), Clock()
    store.down = True
    auth = Authenticator("auto", store, clock=clock)
    with pytest.raises(StoreUnavailable):
        auth.authenticate({})  # auto mode must not open up just because the keys cannot be read


def test_auth_off_never_reads_the_store():
    store = Store(KEYS)
    store.down = True
    assert Authenticator("off", store).authenticate({}) is None and store.loads == 0


def test_the_first_key_is_honoured_at_once_in_auto_mode():
    """Open (no key yet) was cached; the first key is created: a call that shows it is that key's
    (its jobs are its own), not anonymous — found by the README test (create a key, then a job)."""
    store, clock = Store({}), Clock()
    auth = Authenticator("auto", store, clock=clock)
    assert auth.authenticate({}) is None  # open: the cached set is empty
    store.keys = dict(KEYS)
    clock.now += 1  # within CACHE_SECONDS of the load that found no keys
    assert auth.authenticate(bearer(KEY)) == "key_1"
    with pytest.raises(AuthenticationFailed):
        auth.authenticate({})  # and from now on auth is required
