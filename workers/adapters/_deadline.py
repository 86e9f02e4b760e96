"""Deadlines of one upstream call that hold whatever the upstream does.

A socket read timeout bounds each ``recv``, not the call: an upstream that sends one byte every few
seconds never trips it and can hold a call for as long as it likes — its headers as well as its body.
So the whole call is under a :class:`CallClock`: the process's :class:`Watchdog` (one thread — a
greenlet in a gevent worker — asleep until the nearest deadline of all calls) shuts the connection's
socket down when a deadline passes. Until the answer's headers are in, the socket is the one the
client's connection (:func:`guarded_pool_classes`) hands the clock of the call it is making
(:data:`CURRENT_CLOCK`); after that, the response's. urllib3's own ``(connect, read)`` timeouts still
bound a silent connect and each read. The reading code then fails or ends early, and
:attr:`CallClock.expired` says which deadline it was, so the failure is reported as
:class:`UpstreamTimeout`, never as a broken or malformed answer.

Deadlines (``Provider.deadlines``), all measured from the start of the call unless said otherwise:

* the answer's status line and headers within ``connect`` + ``first_byte``;
* non-streamed: the first byte within ``first_byte``, the whole answer within ``total``;
* streamed: the first event within ``first_byte``, each next one within ``idle`` of the one before,
  the whole stream within ``stream_total``.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import socket
import threading
import time
from typing import Any

from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection

from common.errors import UpstreamTimeout
from common.registry import CallDeadlines

#: the clock of the call this thread (greenlet) is making, while it waits for the answer's headers
CURRENT_CLOCK: contextvars.ContextVar[CallClock | None] = contextvars.ContextVar("upstream_call_clock",
                                                                                 default=None)


class CallClock:
    """The deadlines of one call. :meth:`start` it before the request (with :data:`CURRENT_CLOCK` set
    to it, the connection hands it its socket: :meth:`guard`); :meth:`watch` the response once its
    headers are in; call :meth:`progress` for each stream event and :meth:`stop` when done."""

    def __init__(self, provider: str, deadlines: CallDeadlines, *, stream: bool,
                 watchdog: Watchdog | None = None) -> None:
        self.provider = provider
        self.deadlines = deadlines
        self.stream = stream
        self.started = time.monotonic()
        self.end = self.started + (deadlines.stream_total if stream else deadlines.total)
        self.next = min(self.end, self.started + deadlines.first_byte)  # the nearest deadline
        self.stopped = False
        self.expired: str | None = None  # which deadline passed, once one did
        self.token = 0  # the watchdog's current entry for this clock (older entries are stale)
        self._scheduled_at = 0.0
        self._progressed = False
        self._response: BaseHTTPResponse | None = None
        self._socket: socket.socket | None = None  # the connection's, until the response is in
        self._watchdog = watchdog or Watchdog.of_process()

    def start(self) -> None:
        """Guard the wait for the answer's headers: cut it ``connect + first_byte`` after the start."""
        self.next = min(self.end, self.started + self.deadlines.connect + self.deadlines.first_byte)
        self._schedule()

    def guard(self, sock: socket.socket | None) -> None:
        """The socket the request goes out on (called by the connection, see :func:`guarded_pool_classes`)."""
        self._socket = sock

    @property
    def request_timeout(self) -> tuple[float, float]:
        """The socket's ``(connect, read)`` timeouts: the read one bounds the wait for the first byte."""
        return self.deadlines.connect, self.deadlines.first_byte

    def watch(self, response: BaseHTTPResponse) -> None:
        """Guard the rest of ``response`` (its headers are in): cut it when a deadline passes."""
        self.next = self.end if not self.stream else min(self.end, self.started + self.deadlines.first_byte)
        self._response = response
        self._socket = None
        self._schedule()

    def progress(self) -> None:
        """A stream event arrived: the next one is due within ``idle`` (and before the end)."""
        self.next = min(self.end, time.monotonic() + self.deadlines.idle)
        self._progressed = True
        if self.next < self._scheduled_at:  # idle < first_byte: the watchdog must look sooner
            self._schedule()
        # a later deadline needs nothing: the watchdog finds it moved when the old one comes

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._response = None
            self._socket = None
            self._watchdog.forget(self)

    def timeout_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.provider} did not send {self.expired or 'its answer in time'}")

    def expire(self) -> None:
        """A deadline passed (the watchdog calls this): note which, and cut the connection."""
        self.expired = self._missed()
        sock = self._socket
        if self._response is None and sock is not None:   # still waiting for the headers
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile: nothing left to cut
                pass
            return
        response = self._response
        if response is None or response.connection is None:
            return  # the body was read to its end and the connection went back to the pool
        try:
            response.shutdown()  # a read blocked on the socket returns at once, also in another thread
        except (ValueError, RuntimeError, OSError):  # closed or released meanwhile: nothing left to cut
            return

    def _schedule(self) -> None:
        self._scheduled_at = self.next
        self._watchdog.schedule(self)

    def _missed(self) -> str:
        d = self.deadlines
        if self._response is None:
            return f"its answer's headers within {d.connect + d.first_byte:g}s"
        if not self.stream:
            return f"its whole answer within {d.total:g}s"
        if self.next >= self.end:
            return f"its whole stream within {d.stream_total:g}s"
        if not self._progressed:
            return f"its first stream event within {d.first_byte:g}s"
        return f"its next stream event within {d.idle:g}s of the one before"


class Watchdog:
    """Expires the clocks whose deadline passed: a heap of (deadline, token, clock) and one thread,
    started on first use, asleep until the earliest. A clock's deadline that moved later is pushed
    again when its old one comes; an entry whose token is not its clock's current one, or whose clock
    stopped, is dropped — and the heap is compacted when such entries outnumber the live ones."""

    _process: Watchdog | None = None
    _process_lock = threading.Lock()

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, CallClock]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._tokens = itertools.count(1)
        self._live = 0
        self._thread: threading.Thread | None = None

    @classmethod
    def of_process(cls) -> Watchdog:
        if cls._process is None:
            with cls._process_lock:
                if cls._process is None:
                    cls._process = Watchdog()
        return cls._process

    def schedule(self, clock: CallClock) -> None:
        with self._lock:
            if clock.token == 0:
                self._live += 1
            clock.token = next(self._tokens)
            heapq.heappush(self._heap, (clock.next, clock.token, clock))
            earliest = self._heap[0][2] is clock
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="upstream-deadlines", daemon=True)
                self._thread.start()
        if earliest:
            self._wake.set()

    def forget(self, clock: CallClock) -> None:
        with self._lock:
            if clock.token:
                self._live -= 1
            if len(self._heap) > 2 * self._live + 1024:
                self._heap = [e for e in self._heap if not e[2].stopped and e[1] == e[2].token]
                heapq.heapify(self._heap)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            due, wait = self._take_due()
            for clock in due:
                clock.expire()
            self._wake.wait(wait)

    def _take_due(self) -> tuple[list[CallClock], float | None]:
        """The clocks whose deadline passed, and how long until the next one."""
        due = []
        with self._lock:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, token, clock = heapq.heappop(self._heap)
                if clock.stopped or token != clock.token:
                    continue
                if clock.next > now:  # it moved later meanwhile
                    heapq.heappush(self._heap, (clock.next, token, clock))
                else:
                    due.append(clock)
            wait = self._heap[0][0] - now if self._heap else None
        return due, wait


class _Guarded:
    """Hands its socket to the clock of the call using it (:data:`CURRENT_CLOCK`), once connected and
    again for each request on a kept-alive connection, so the clock can cut a headers drip. A mixin:
    the HTTPS class had these methods copied from the HTTP one, whose ``super()`` then raised
    ``TypeError`` on every HTTPS call."""

    sock: socket.socket | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _guard(self.sock)

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _guard(self.sock)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _GuardedHTTPConnection(_Guarded, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


def _guard(sock: socket.socket | None) -> None:
    clock = CURRENT_CLOCK.get()
    if clock is not None:
        clock.guard(sock)


def guarded_pool_classes() -> dict[str, type[HTTPConnectionPool]]:
    """urllib3's pool classes by scheme whose connections hand their socket to the current call's clock
    (``PoolManager.pool_classes_by_scheme``)."""
    return {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
