"""The limit-kind table (common/limits.py LIMIT_KINDS) and its Lua steps (common/lua/permits.lua) agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common import lua
from common.limits import LIMIT_KINDS, Scope
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


SCOPES = [
    ("provider-concurrency", Scope("p", Limits(concurrency=2)), False, {"concurrency": 2}),
    ("model-rpm-tpm", Scope.of_model("p", "m", Limits(rpm=10, tpm=1000)), False, {"rpm": 10, "tpm": 1000}),
    ("key-daily", Scope.of_key("k1", Limits(rpd=5, tpd=50)), True, {"rpd": 5, "tpd": 50}),
]


@pytest.mark.parametrize(("scope", "is_key", "limits"), [c[1:] for c in SCOPES], ids=[c[0] for c in SCOPES])
def test_scope_steps_list_every_kind_in_table_order(scope, is_key, limits):
    steps = scope.steps()
    assert steps["key"] is is_key
    assert steps["kinds"] == [[kind.name, limits.get(kind.name, 0)] for kind in LIMIT_KINDS]


def test_every_script_loads_with_its_libraries():
    for name in ("create", "claim", "withdraw", "emit", "renew_lease", "acquire", "release", "leave",
                 "renew_permits"):
        assert lua.source(name).strip()
    assert "job_check" in lua.source("claim") and "job_check" in lua.source("acquire")
