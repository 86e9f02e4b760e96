"""The pieces of the adapters' HTTP client that need no socket: a streamed body's lines, what a failed
POST means, and a body that is not JSON. The client against a real upstream is in
tests/integration/test_upstream_deadlines.py and test_adapters_native.py."""

from __future__ import annotations

import pytest
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError

from common.errors import UpstreamRejected
from common.registry import Provider
from workers.adapters import _http as http
from workers.adapters._deadline import CallClock, Watchdog

# id, the body as it was read, piece by piece; its lines
LINES = [
    ("one-piece", [b"data: a\n\ndata: b\n\n"], [b"data: a", b"", b"data: b", b""]),
    ("line-split-across-pieces", [b"data: a", b"bc\n", b"\n"], [b"data: abc", b""]),
    ("crlf", [b"data: a\r\n\r\n"], [b"data: a", b""]),
    ("last-line-without-a-break", [b"{\"a\": 1}\n{\"b\"", b": 2}"], [b"{\"a\": 1}", b"{\"b\": 2}"]),
    ("nothing", [], []),
]


@pytest.mark.parametrize(("pieces", "lines"), [c[1:] for c in LINES], ids=[c[0] for c in LINES])
def test_a_streamed_body_splits_into_its_lines(pieces: list[bytes], lines: list[bytes]) -> None:
    assert list(http.split_lines(iter(pieces))) == lines


# id, what the POST raised, our error's type, timed out connecting
FAILURES = [
    ("refused", NewConnectionError(None, "refused"), http.NotConnected, False),  # type: ignore[arg-type]
    ("connect-timeout", ConnectTimeoutError("slow"), http.NotConnected, True),
    ("reset", ProtocolError("Connection aborted.", ConnectionResetError()), http.NotConnected, False),
    ("header-refused", ValueError("Invalid header value b'Bearer sk-secret\\n'"), http.NotConnected, False),
    ("no-first-byte", ReadTimeoutError(None, None, "Read timed out."), http.NoAnswer, None),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("exc", "kind", "timed_out"), [c[1:] for c in FAILURES],
                         ids=[c[0] for c in FAILURES])
def test_a_failed_post_is_not_connected_or_no_answer(exc: Exception, kind: type,
                                                    timed_out: bool | None) -> None:
    clock = CallClock("up", Provider(kind="openai").deadlines, stream=False, watchdog=Watchdog())
    error = http.transport_error(exc, clock)
    assert type(error) is kind
    assert getattr(error, "timed_out", None) is timed_out
    assert "sk-secret" not in str(error)


def test_a_post_the_deadline_cut_is_no_answer_whatever_the_socket_said() -> None:
    clock = CallClock("up", Provider(kind="openai").deadlines, stream=False, watchdog=Watchdog())
    clock.expired = "its answer's headers within 1.5s"
    assert type(http.transport_error(ProtocolError("Connection aborted."), clock)) is http.NoAnswer


@pytest.mark.parametrize("number", [float("nan"), float("inf")], ids=["nan", "infinity"])
def test_a_body_with_a_number_json_lacks_is_rejected_before_any_call(number: float) -> None:
    with pytest.raises(UpstreamRejected) as caught:
        http.encode({"model": "m", "temperature": number})
    assert caught.value.status == 400
