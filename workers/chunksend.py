"""Sending a stream's chunks to the waiting API: the first the moment it exists, the rest coalesced.

A streamed job's worker reads chunks from upstream and hands each to a :class:`ChunkSender`. Its own
thread (a greenlet under the gevent pool) sends what has been handed over, in order, in one Redis
round trip (:meth:`common.jobs.JobStore.emit_chunks`). While one send is in flight the reader goes on
reading; the chunks that arrive meanwhile go out together in the next send. So chunks are batched only
when Redis and the API are slower than the upstream — a slow upstream's every chunk goes out alone, at
once — and a fast upstream's twenty chunks cost a few round trips instead of twenty.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from common.contract import JobEvent


class ChunkSender:
    """Sends events in the order :meth:`put` got them, with ``send`` (a batch at a time). A failed
    send stops it: the error is raised by the next :meth:`put` or by :meth:`close`."""

    def __init__(self, send: Callable[[Sequence[JobEvent]], None]) -> None:
        self._send = send
        self._pending: list[JobEvent] = []
        self._closed = False
        self._error: BaseException | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="chunk-sender", daemon=True)
        self._thread.start()

    def put(self, event: JobEvent) -> None:
        """Hand ``event`` over (it goes out as soon as the sender is free); raises a failed send's error."""
        with self._wake:
            if self._error is not None:
                raise self._error
            self._pending.append(event)
            self._wake.notify()

    def close(self) -> None:
        """Wait until every event handed over went out; raises a failed send's error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                self._send(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                with self._wake:
                    self._error = exc
                return
