"""Unit tests do no I/O beyond reading files: no network, no subprocesses. Anything that needs a
server, Redis, Postgres or a child process belongs in ``tests/integration``. Enforced here: a unit test
that opens a connection, binds a port or starts a process fails, naming what it tried."""

from __future__ import annotations

import socket
import subprocess
from typing import Any, NoReturn

import pytest


def _forbidden(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"a unit test must do no I/O ({what}); move it to tests/integration")
    return refuse


@pytest.fixture(autouse=True)
def _no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _forbidden("socket connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", _forbidden("socket connect"))
    monkeypatch.setattr(socket.socket, "bind", _forbidden("socket bind"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _forbidden("subprocess"))
