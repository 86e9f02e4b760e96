"""The upstream connection classes (workers/adapters/_deadline.py): the HTTPS one reaches urllib3's
methods as the HTTP one does (its ``connect`` and ``getresponse`` were the HTTP class's, copied, and
their ``super()`` raised ``TypeError``: every HTTPS upstream call failed), and both hand their socket
to the current call's clock. The connect is tested in tests/integration/test_upstream_https.py."""

from __future__ import annotations

import pytest

from workers.adapters import _deadline
from workers.adapters._deadline import _GuardedHTTPConnection, _GuardedHTTPSConnection

KINDS = pytest.mark.parametrize("kind", [_GuardedHTTPConnection, _GuardedHTTPSConnection],
                                ids=["http", "https"])


class Clock:
    def __init__(self) -> None:
        self.guarded: list[object] = []

    def guard(self, sock: object) -> None:
        self.guarded.append(sock)


@KINDS
def test_waiting_for_the_answer_hands_the_socket_to_the_calls_clock(kind):
    conn, clock = kind("127.0.0.1", 1), Clock()
    conn.sock = sock = object()
    token = _deadline.CURRENT_CLOCK.set(clock)
    try:
        with pytest.raises(Exception) as no_request:   # http.client: nothing was sent on it
            conn.getresponse()
    finally:
        _deadline.CURRENT_CLOCK.reset(token)
    assert not isinstance(no_request.value, TypeError)
    assert clock.guarded == [sock]
