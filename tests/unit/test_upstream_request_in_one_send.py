"""The upstream connection classes (workers/adapters/_deadline.py): a request with a body leaves in one
``sendall`` — head and body together, as http.client's own ``request`` sends them (urllib3 sends them
apart: two segments, and the upstream waits for the second) — and the HTTPS class works as the HTTP one
(its methods reach urllib3's through ``super()``)."""

from __future__ import annotations

import pytest

from workers.adapters._deadline import _GuardedHTTPConnection, _GuardedHTTPSConnection


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def settimeout(self, timeout: float | None) -> None:
        pass


# (body, chunked, how many sendalls, what the last one ends with)
CASES = [
    pytest.param(b'{"model":"m"}', False, 1, b'\r\n\r\n{"model":"m"}', id="bytes-body-with-the-head"),
    pytest.param(None, False, 1, b"\r\n\r\n", id="no-body-the-head-alone"),
    pytest.param(b"", False, 1, b"\r\n\r\n", id="empty-body-the-head-alone"),
    pytest.param(b"abc", True, 2, b"0\r\n\r\n", id="chunked-head-with-the-first-chunk-then-the-end"),
]


@pytest.mark.parametrize("kind", [_GuardedHTTPConnection, _GuardedHTTPSConnection], ids=["http", "https"])
@pytest.mark.parametrize(("body", "chunked", "sends", "tail"), CASES)
def test_what_one_request_sends(kind, body, chunked, sends, tail):
    conn = kind("127.0.0.1", 1)
    conn.sock = sock = RecordingSocket()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Authorization": "Bearer k"},
                 chunked=chunked)
    assert len(sock.sent) == sends
    assert sock.sent[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert sock.sent[-1].endswith(tail)


def test_the_next_request_on_the_connection_holds_its_own_head_only():
    conn = _GuardedHTTPConnection("127.0.0.1", 1)
    conn.sock = sock = RecordingSocket()
    conn.request("POST", "/a", body=b"1")
    conn._HTTPConnection__state = "Idle"   # http.client: the answer was read (not under test here)
    conn._HTTPConnection__response = None
    conn.request("GET", "/b")
    assert [s.split(b" ")[0] for s in sock.sent] == [b"POST", b"GET"]
    assert sock.sent[0].endswith(b"\r\n\r\n1")


def test_the_https_class_connects_as_the_http_one():
    """Its ``connect`` reaches urllib3's (a refused port says so, not a TypeError from ``super()``)."""
    with pytest.raises(Exception) as refused:
        _GuardedHTTPSConnection("127.0.0.1", 1).connect()
    assert not isinstance(refused.value, TypeError)
