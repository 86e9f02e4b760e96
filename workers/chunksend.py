"""Sending a stream's chunks to the waiting API: the first token the moment it exists, the rest coalesced.

A streamed job's worker reads chunks from upstream and hands each to a :class:`ChunkSender`. Its own
thread (a greenlet under the gevent pool) sends what has been handed over, in order, in one Redis
round trip (:meth:`common.jobs.JobStore.emit_chunks`: one script call, one message to the API). While
one send is in flight the reader goes on reading; the chunks that arrive meanwhile go out together in
the next send. So chunks are batched only when Redis and the API are slower than the upstream — a slow
upstream's every chunk goes out alone, at once — and a fast upstream's twenty chunks cost a few round
trips instead of twenty.

Under gevent a greenlet runs only when the one running blocks: a reader whose upstream bytes are
already buffered would read the whole stream before the sender ever ran, and the first token would wait
for the last. So the chunk that carries the first token is put ``urgent``: the reader waits until the
sender has taken it (and what came before it) — one switch, not a round trip, unless a send is in
flight — and reads on while it goes out.
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
        self._put = 0      # events handed over so far
        self._taken = 0    # of those, events the sender has taken to send
        self._closed = False
        self._error: BaseException | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="chunk-sender", daemon=True)
        self._thread.start()

    def put(self, event: JobEvent, *, urgent: bool = False) -> None:
        """Hand ``event`` over (it goes out as soon as the sender is free); raises a failed send's error.
        ``urgent``: return only once the sender has taken it — it is on its way, whatever the reader
        does next."""
        with self._wake:
            if self._error is not None:
                raise self._error
            self._pending.append(event)
            self._put += 1
            self._wake.notify_all()
            while urgent and self._taken < self._put and self._error is None:
                self._wake.wait()
            if self._error is not None and urgent:
                raise self._error

    def close(self) -> None:
        """Wait until every event handed over went out; raises a failed send's error."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
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
                self._taken += len(batch)
                self._wake.notify_all()  # an urgent put waits for this
            try:
                self._send(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                with self._wake:
                    self._error = exc
                    self._wake.notify_all()
                return
