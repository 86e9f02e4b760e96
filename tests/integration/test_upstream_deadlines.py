"""An adapter's deadlines against the fake upstream process (plain threads here; the gevent worker path
is in test_upstream_answers.py): a drip-fed answer, a drip-fed stream and a stream that goes quiet end
at their deadline plus a small margin, and the deadlines cost no connection reuse."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

from common.errors import UpstreamBadResponse, UpstreamTimeout
from common.registry import Model, Provider
from common.types import ChatRequest
from tests.fakeprovider import FakeProvider
from tests.faults import TcpProxy
from workers.adapters.base import Adapter, build_adapter, make_http_session

pytestmark = pytest.mark.integration

MARGIN = 0.5  # seconds past a deadline that a cut call may take to return


def adapter(fake: FakeProvider, base_url: str | None = None, **deadlines: Any) -> Adapter:
    provider = Provider(name="deadlined", kind="openai", base_url=base_url or fake.base_url, api_key="k",
                        **deadlines)
    return build_adapter(provider, make_http_session(4))


def ask(text: str) -> ChatRequest:
    return ChatRequest(model="alias", messages=[{"role": "user", "content": text}])


MODEL = Model(provider="deadlined", model="fake-model")

# id, deadlines, magic content, streamed, the deadline that must end it (s), what it says
CASES = [
    (
        "drip-fed-answer-hits-the-whole-call-deadline",
        {"timeout": 1.5},
        "drip:0.2 a b c d e f g h i j k l m n",
        False,
        1.5,
        "whole answer within 1.5s",
    ),
    (
        "drip-fed-stream-hits-the-first-event-deadline",
        {"timeout": 5, "first_byte_timeout": 1.0},
        "drip:0.2 a b c",
        True,
        1.0,
        "first stream event within 1s",
    ),
    (
        "quiet-stream-hits-the-idle-deadline",
        {"timeout": 5, "first_byte_timeout": 2, "idle_timeout": 0.6},
        "sleepy a b c d",
        True,
        0.6,
        "next stream event within 0.6s",
    ),
    (
        "long-stream-hits-its-cap",
        {"timeout": 5, "stream_timeout": 1.2, "idle_timeout": 1},
        " ".join(["word"] * 40),
        True,
        1.2,
        "whole stream within 1.2s",
    ),
]


@pytest.mark.parametrize(
    ("deadlines", "text", "stream", "limit", "what"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_call_ends_at_its_deadline(
    fake: FakeProvider, deadlines: dict[str, float], text: str, stream: bool, limit: float, what: str
) -> None:
    if text.startswith("sleepy"):
        fake.configure(chunk_delay_ms=1000)  # > idle_timeout, < first_byte_timeout
    elif text.startswith("word"):
        fake.configure(chunk_delay_ms=100)  # 40 chunks: 4 s, each gap well inside idle_timeout
    client = adapter(fake, **deadlines)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=what):
        if stream:
            list(client.stream(ask(text), MODEL))
        else:
            client.complete(ask(text), MODEL)
    elapsed = time.monotonic() - started
    assert limit <= elapsed + 0.05 and elapsed < limit + MARGIN


def test_a_slow_but_steady_stream_is_not_cut(fake: FakeProvider) -> None:
    fake.configure(chunk_delay_ms=300)
    chunks = list(adapter(fake, timeout=5, idle_timeout=1).stream(ask("one two three four five"), MODEL))
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        == "echo: one two three four five"
    )


def test_answers_and_streams_reuse_their_connection(fake: FakeProvider) -> None:
    """Every call reads its body under the deadline: a whole answer hands its connection back for the
    next call, and so does a stream once its ``[DONE]`` is in (it is not closed with the end of its
    chunked body unread). Counted as TCP connections the upstream accepted."""
    upstream = urlsplit(fake.base_url)
    with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as proxy:
        client = adapter(fake, proxy.url(fake.base_url), timeout=5)
        for i in range(5):
            client.complete(ask(f"call {i}"), MODEL)
            list(client.stream(ask(f"stream {i}"), MODEL))
        assert proxy.accepted == 1


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_an_upstream_that_drip_feeds_its_headers_is_cut_at_the_call_deadline(fake: FakeProvider,
                                                                            stream: bool) -> None:
    """A byte of the status line and headers every 0.2 s never trips a read timeout; the call's
    deadline (connect + first byte: 1.5 s here) cuts it all the same."""
    upstream = urlsplit(fake.base_url)
    with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as proxy:
        proxy.drip(0.2)
        client = adapter(fake, proxy.url(fake.base_url), timeout=20, connect_timeout=0.5,
                         first_byte_timeout=1)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="headers within 1.5s"):
            if stream:
                list(client.stream(ask("drip my headers"), MODEL))
            else:
                client.complete(ask("drip my headers"), MODEL)
        elapsed = time.monotonic() - started
    assert 1.5 <= elapsed + 0.05 and elapsed < 1.5 + MARGIN, elapsed


STREAM_THEN_HOLD = b"".join([
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    *(b"%x\r\n%s\r\n" % (len(e), e) for e in (
        b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n', b"data: [DONE]\n\n")),
])  # a choice and [DONE], and the chunked body never ended


@contextmanager
def answering_once(answer: bytes) -> Iterator[str]:
    """A base URL whose server answers one call with ``answer`` as is (a status line and headers, and
    whatever body), then holds the connection open until the block ends."""
    held = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=_answer_once, args=(listener, answer, held), daemon=True)
        server.start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        finally:
            held.set()
            server.join(5)


def _answer_once(listener: socket.socket, answer: bytes, held: threading.Event) -> None:
    conn, _ = listener.accept()
    with conn:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(65536)
        conn.sendall(answer)
        held.wait(5)


def test_a_stream_held_open_after_its_done_ends_at_once(fake: FakeProvider) -> None:
    """Reading the rest of a finished stream (to keep its connection) waits only briefly: an upstream
    that never ends the chunked body after ``[DONE]`` costs the call a moment, not its idle deadline."""
    with answering_once(STREAM_THEN_HOLD) as base_url:
        started = time.monotonic()
        chunks = list(adapter(fake, base_url, timeout=5).stream(ask("hello"), MODEL))
        elapsed = time.monotonic() - started
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["hi"]
    assert elapsed < 0.5, elapsed


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_redirect_is_not_followed_and_says_so(fake: FakeProvider, status: int) -> None:
    moved = b"HTTP/1.1 %d Moved\r\nLocation: https://elsewhere/v1/chat/completions\r\n" % status
    with answering_once(moved + b"Content-Length: 0\r\n\r\n") as base_url:
        with pytest.raises(UpstreamBadResponse, match=f"redirect \\(HTTP {status}\\).*base_url"):
            adapter(fake, base_url, timeout=5).complete(ask("hello"), MODEL)
