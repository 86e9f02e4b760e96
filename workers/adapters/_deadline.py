"""Deadlines of one upstream call that hold whatever the upstream does.

A socket read timeout bounds each ``recv``, not the call: an upstream that sends one byte every few
seconds never trips it and can hold a call for as long as it likes. So the connection and the first
byte of the answer are bounded by requests' own ``(connect, read)`` timeouts, and everything after
the headers by a :class:`CallClock`: a watchdog (one thread — a greenlet in a gevent worker — asleep
until the nearest deadline) that shuts the connection's socket down when a deadline passes. The
reading code then fails or ends early, and :attr:`CallClock.expired` says which deadline it was, so
the failure is reported as :class:`UpstreamTimeout`, never as a broken or malformed answer.

Deadlines (``Provider.deadlines``), all measured from the start of the call unless said otherwise:

* non-streamed: the first byte within ``first_byte``, the whole answer within ``total``;
* streamed: the first event within ``first_byte``, each next one within ``idle`` of the one before,
  the whole stream within ``stream_total``.
"""

from __future__ import annotations

import threading
import time

import requests

from common.errors import UpstreamTimeout
from common.registry import CallDeadlines


class CallClock:
    """The deadlines of one call. Start it before the request; :meth:`watch` the response once its
    headers are in; call :meth:`progress` for each stream event and :meth:`stop` when done."""

    def __init__(self, provider: str, deadlines: CallDeadlines, *, stream: bool) -> None:
        self.provider = provider
        self.deadlines = deadlines
        self.stream = stream
        self.started = time.monotonic()
        self._end = self.started + (deadlines.stream_total if stream else deadlines.total)
        self._next = min(self._end, self.started + deadlines.first_byte)
        self._progressed = False
        self._wake = threading.Event()  # the deadline moved earlier, or the call is over
        self._stopped = False
        self._sleeping_until = self._next
        self._response: requests.Response | None = None
        self.expired: str | None = None  # what the upstream had not sent when its deadline passed

    @property
    def request_timeout(self) -> tuple[float, float]:
        """requests' ``(connect, read)`` timeout: the read one bounds the wait for the first byte."""
        return self.deadlines.connect, self.deadlines.first_byte

    def watch(self, response: requests.Response) -> None:
        """Guard the rest of ``response`` (its headers are in): cut it when a deadline passes."""
        if not self.stream:
            self._next = self._end
        self._response = response
        threading.Thread(target=self._watchdog, name="upstream-deadline", daemon=True).start()

    def progress(self) -> None:
        """A stream event arrived: the next one is due within ``idle`` (and before the end)."""
        self._next = min(self._end, time.monotonic() + self.deadlines.idle)
        self._progressed = True
        if self._next < self._sleeping_until:  # idle < first_byte: the watchdog must wake up sooner
            self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def timeout_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.provider} did not send {self.expired or 'its answer in time'}")

    def _missed(self) -> str:
        d = self.deadlines
        if not self.stream:
            return f"its whole answer within {d.total:g}s"
        if self._next >= self._end:
            return f"its whole stream within {d.stream_total:g}s"
        if not self._progressed:
            return f"its first stream event within {d.first_byte:g}s"
        return f"its next stream event within {d.idle:g}s of the one before"

    def _watchdog(self) -> None:
        """Sleep until the nearest deadline; deadlines that moved later are simply slept on again."""
        while True:
            self._sleeping_until = self._next
            woken = self._wake.wait(max(0.0, self._sleeping_until - time.monotonic()))
            if self._stopped:
                return
            if woken:
                self._wake.clear()
            elif time.monotonic() >= self._next:
                self.expired = self._missed()
                self._cut()
                return

    def _cut(self) -> None:
        """Shut the socket down: a read blocked on it returns at once (also across threads)."""
        raw = getattr(self._response, "raw", None)
        if raw is None or getattr(raw, "connection", None) is None:
            return  # the body was read to its end and the connection went back to the pool
        try:
            raw.shutdown()
        except (ValueError, RuntimeError, OSError):  # closed or released meanwhile: nothing left to cut
            return
