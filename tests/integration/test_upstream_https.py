"""An HTTPS upstream is reached through the guarded connection classes (workers/adapters/_deadline.py):
a refused HTTPS connect is our ``NotConnected`` (a real socket, a closed port), not the ``TypeError``
every HTTPS call raised while the HTTPS class borrowed the HTTP class's methods."""

from __future__ import annotations

import socket

import pytest

from common.registry import CallDeadlines
from workers.adapters._deadline import CallClock
from workers.adapters._http import HttpClient, NotConnected, send

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_refused_connect_is_not_connected_on_either_scheme(scheme):
    clock = CallClock("p", CallDeadlines(1, 1, 5, 5, 5), stream=False)
    with pytest.raises(NotConnected):
        send(HttpClient(2), f"{scheme}://127.0.0.1:{_closed_port()}/v1/chat/completions", {"a": 1}, {}, clock)
