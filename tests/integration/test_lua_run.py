"""``common.lua.LeanScript`` (every script ``lua.register`` makes): a call is one bare EVALSHA, against
the real Redis — the reply is the script's, errors are Redis's, and a script Redis does not know (never
loaded, or lost in a restart) is loaded and run once."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from common import lua
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import delete_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(TEST_REDIS_URL)
    yield c
    c.close()
    delete_prefix("gwluarun")


def test_a_script_redis_does_not_know_yet_is_loaded_and_run_once(client):
    key = f"gwluarun:{secrets.token_hex(4)}"
    body = "return {redis.call('INCR', KEYS[1]), ARGV[1]}"
    fresh = lua.LeanScript(client, f"-- {secrets.token_hex(8)}\n{body}")
    assert not client.script_exists(fresh.sha)[0]
    assert fresh([key], ["a"]) == [1, b"a"]   # NOSCRIPT, loaded, ran once
    assert fresh([key], [7]) == [2, b"7"]     # known now: one EVALSHA
    assert int(client.get(key)) == 2


def test_a_script_error_is_raised_as_redis_gives_it(client):
    failing = lua.LeanScript(client, f"-- {secrets.token_hex(8)}\nreturn redis.error_reply('nope')")
    with pytest.raises(redis.exceptions.ResponseError, match="nope"):
        failing([], [])
