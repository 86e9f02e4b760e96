"""The authenticator through a Postgres outage: the last good key set for a bounded time, then 503;
one log line when the outage starts and one when it ends; no reload storm."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
import redis
import sqlalchemy.exc

from api.auth import CACHE_SECONDS, OUTAGE_RETRY_SECONDS, VERSION_CHECK_SECONDS, Authenticator, LastUsed
from common.apikeys import hash_secret
from common.errors import AuthenticationFailed, StoreUnavailable
from common.keyschema import KeyRecord

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


OTHER = "sk-gw-other"


class Version:
    """The key-change counter as Redis holds it; ``down`` makes it raise as a lost Redis would."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.down = False
        self.reads = 0

    def __call__(self) -> str | None:
        self.reads += 1
        if self.down:
            raise redis.ConnectionError("refused")
        return self.value


@pytest.fixture
def signalled():
    store, clock, version = Store(KEYS), Clock(), Version()
    return store, clock, version, Authenticator("auto", store, clock=clock, version=version)


def test_a_moved_change_counter_reloads_the_set_at_the_next_check(signalled):
    store, clock, version, auth = signalled
    assert auth.authenticate(bearer(KEY)) == "key_1"
    store.keys = {hash_secret(OTHER): "key_9"}   # revoked (another key stays: auto stays closed) ...
    version.value = "1"        # ... and signalled
    clock.now += VERSION_CHECK_SECONDS / 2
    assert auth.authenticate(bearer(KEY)) == "key_1"   # not read yet: within one check period
    clock.now += VERSION_CHECK_SECONDS
    with pytest.raises(AuthenticationFailed):
        auth.authenticate(bearer(KEY))
    loads = store.loads
    for _ in range(100):   # an unmoved counter costs no reload
        clock.now += VERSION_CHECK_SECONDS
        assert auth.authenticate(bearer(OTHER)) == "key_9"
    # only the periodic reload (every CACHE_SECONDS) remains
    assert store.loads - loads <= 100 * VERSION_CHECK_SECONDS / CACHE_SECONDS + 1


def test_a_key_created_a_moment_ago_works_at_once(signalled):
    store, clock, version, auth = signalled
    auth.authenticate(bearer(KEY))
    store.keys = {**KEYS, hash_secret("sk-gw-new"): "key_2"}
    version.value = "1"
    assert auth.authenticate(bearer("sk-gw-new")) == "key_2"   # same instant: the miss reads the counter


def test_without_the_signal_the_set_is_still_reloaded_periodically(signalled, caplog):
    store, clock, version, auth = signalled
    auth.authenticate(bearer(KEY))
    version.down = True
    store.keys = {hash_secret(OTHER): "key_9"}
    caplog.set_level(logging.WARNING, logger="api.auth")
    for _ in range(10):
        clock.now += 0.4
        auth.authenticate(bearer(KEY))   # the counter is unreadable: the cached set answers
    assert len([r for r in caplog.records if "signal" in r.getMessage()]) == 1
    clock.now += CACHE_SECONDS
    with pytest.raises(AuthenticationFailed):
        auth.authenticate(bearer(KEY))


def test_the_postgres_outage_rules_hold_with_the_signal(signalled):
    store, clock, version, auth = signalled
    auth.authenticate(bearer(KEY))
    store.down = True
    version.value = "7"   # a change signalled while Postgres is down: the last set keeps answering
    for _ in range(20):
        clock.now += 10
        assert auth.authenticate(bearer(KEY)) == "key_1"
    clock.now += 120   # past the stale limit
    with pytest.raises(StoreUnavailable):
        auth.authenticate(bearer(KEY))


def test_last_used_is_written_in_batches():
    writes: list[set[str]] = []
    last_used = LastUsed(lambda ids, at: writes.append(set(ids)), interval=3600)
    for _ in range(1000):
        last_used.mark("key_1")
    last_used.mark("key_2")
    last_used.flush()
    last_used.flush()   # nothing new: no write
    assert writes == [{"key_1", "key_2"}]


def test_a_failed_last_used_write_is_logged_not_raised(caplog):
    def down(ids, at):
        raise sqlalchemy.exc.OperationalError("UPDATE", {}, ConnectionRefusedError("refused"))
    last_used = LastUsed(down, interval=3600)
    last_used.mark("key_1")
    caplog.set_level(logging.WARNING, logger="api.auth")
    last_used.flush()
    assert "not recorded" in caplog.records[-1].getMessage()


def test_in_auto_mode_a_revoked_last_key_keeps_the_gateway_closed():
    """The key set holds revoked keys too: revoking the only key must not make it 'a fresh install'."""
    revoked = KeyRecord("key_1", revoked=True)
    auth = Authenticator("auto", Store({hash_secret(KEY): revoked}))
    with pytest.raises(AuthenticationFailed):
        auth.authenticate({})
    found = auth.authenticate(bearer(KEY))
    assert found is revoked
    with pytest.raises(AuthenticationFailed) as err:
        found.check_usable(datetime.now(UTC))
    assert err.value.code == "key_revoked"
