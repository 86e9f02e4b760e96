"""The limit-kind table (common/limits.py LIMIT_KINDS) and its Lua steps (common/lua/permits.lua) agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from common import lua
from common.jobs import JobStore
from common.limits import LIMIT_KINDS, Limiter, Scope
from common.registry import Limits

PERMITS_LUA = (Path(lua.__file__).parent / "permits.lua").read_text()
LUA_KINDS = {name: int(keys) for name, keys in
             re.findall(r"^KINDS\.(\w+) = \{keys = (\d+),", PERMITS_LUA, re.MULTILINE)}
# each kind's entry: from its ``KINDS.<name> = {`` to the next blank line
LUA_ENTRIES = dict(re.findall(r"^KINDS\.(\w+) = (\{.*?)\n\n", PERMITS_LUA, re.MULTILINE | re.DOTALL))


def test_every_limits_field_is_a_kind():
    assert [kind.name for kind in LIMIT_KINDS] == list(Limits.model_fields)


@pytest.mark.parametrize("kind", LIMIT_KINDS, ids=[k.name for k in LIMIT_KINDS])
def test_each_kind_has_its_lua_step_with_as_many_keys(kind):
    assert LUA_KINDS.get(kind.name) == len(kind.keys)
    for step in ("check", "take", "settle"):
        assert re.search(rf"\b{step} = function", LUA_ENTRIES[kind.name])


def test_no_lua_kind_without_a_row():
    assert set(LUA_KINDS) == {kind.name for kind in LIMIT_KINDS}


def test_key_suffixes_are_distinct():
    suffixes = [s for kind in LIMIT_KINDS for s in kind.keys]
    assert len(suffixes) == len(set(suffixes))


WINDOWED = [["concurrency", 0], ["rpm", 0], ["tpm", 0]]
SCOPES = [
    ("provider-concurrency", Scope("p", Limits(concurrency=2)), False,
     [["concurrency", 2], ["rpm", 0], ["tpm", 0]]),
    ("model-rpm-tpm", Scope.of_model("p", "m", Limits(rpm=10, tpm=1000)), False,
     [["concurrency", 0], ["rpm", 10], ["tpm", 1000]]),
    ("key-daily: both day counters kept", Scope.of_key("k1", Limits(rpd=5)), True,
     [*WINDOWED, ["rpd", 5], ["tpd", 0]]),
    ("key-both-daily", Scope.of_key("k1", Limits(rpd=5, tpd=50)), True, [*WINDOWED, ["rpd", 5], ["tpd", 50]]),
]


@pytest.mark.parametrize(("scope", "is_key", "steps"), [c[1:] for c in SCOPES], ids=[c[0] for c in SCOPES])
def test_scope_steps_list_its_counted_kinds_in_table_order(scope, is_key, steps):
    assert scope.steps() == {"key": is_key, "kinds": steps}
    limiter = Limiter(JobStore(redis.Redis(), "P"))  # a client that never connects: key names only
    assert len(limiter._scope_keys([scope])) == sum(len(kind.keys) for kind in scope.kinds())

