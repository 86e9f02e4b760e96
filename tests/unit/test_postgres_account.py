"""The embedded PostgreSQL's system account when `up` runs as root: created once, and two `up`s racing
to create it (tests in parallel, or two terminals) both end up with it instead of one failing."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace
from typing import Any

import pytest

from launcher import embedded_postgres as ep
from launcher.embedded_postgres import EmbeddedServerError, _postgres_account

ACCOUNT = SimpleNamespace(pw_name=ep.POSTGRES_SYSTEM_USER, pw_uid=999, pw_gid=999)


class World:
    """/etc/passwd as seen by successive lookups, and useradd's successive exit codes."""

    def __init__(self, lookups: list[bool], useradd: list[int]) -> None:
        self.lookups, self.codes = list(lookups), list(useradd)
        self.useradds = 0

    def getpwnam(self, name: str) -> Any:
        assert name == ep.POSTGRES_SYSTEM_USER
        if self.lookups.pop(0) if self.lookups else True:
            return ACCOUNT
        raise KeyError(name)

    def run(self, argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert ep.POSTGRES_SYSTEM_USER in argv
        self.useradds += 1
        code = self.codes.pop(0)
        return subprocess.CompletedProcess(argv, code, "", "" if code == 0 else f"useradd: error {code}")


@pytest.mark.parametrize(("lookups", "useradd", "created_by_us"), [
    ([True], [], 0),                                  # exists already: nothing run
    ([False, True], [0], 1),                          # missing: created
    ([False, True], [9], 1),                          # another `up` created it first (exit 9: exists)
    ([False, False, True], [10, 0], 2),               # /etc/passwd locked by the other useradd: retried
    ([False, False, False, True], [10, 10, 0], 3),
], ids=["exists", "created", "lost-the-race", "locked-then-created", "locked-twice"])
def test_the_account_is_there_after_a_race(monkeypatch: pytest.MonkeyPatch, lookups: list[bool],
                                            useradd: list[int], created_by_us: int) -> None:
    world = World(lookups, useradd)
    monkeypatch.setattr(ep.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ep.pwd, "getpwnam", world.getpwnam)
    monkeypatch.setattr(ep.subprocess, "run", world.run)
    monkeypatch.setattr(ep.time, "sleep", lambda s: None)
    assert _postgres_account() is ACCOUNT
    assert world.useradds == created_by_us


def test_a_useradd_that_keeps_failing_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World([False] * 20, [1] * ep.USERADD_ATTEMPTS)
    monkeypatch.setattr(ep.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ep.pwd, "getpwnam", world.getpwnam)
    monkeypatch.setattr(ep.subprocess, "run", world.run)
    monkeypatch.setattr(ep.time, "sleep", lambda s: None)
    with pytest.raises(EmbeddedServerError, match="set DATABASE_URL"):
        _postgres_account()
    assert world.useradds == ep.USERADD_ATTEMPTS


def test_not_root_runs_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ep.os, "geteuid", lambda: 1000)
    assert _postgres_account() is None
