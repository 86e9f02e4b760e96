"""Celery's task events, batched and sent off the job's path, under the gevent pool. Importing this
module changes nothing: :func:`install` adds the bootstep, called once by the worker's start-up
(``workers/worker.py``).

**Why.** With task events on (the default: Flower's task views need them) a worker sends three events
per job — ``task-received``, ``task-started``, ``task-succeeded`` — and under the gevent pool each is a
synchronous PUBLISH round trip in the greenlet that sends it: two of them stood between a message's
delivery and our code's first step (a Redis MONITOR of one call: BRPOP → unacked bookkeeping →
PUBLISH task.received → PUBLISH task.started → our claim). Celery's own dispatcher knows better: with
``buffer_group=['task']`` it buffers task events and sends them as one ``task.multi`` message (a list,
which Celery's event receiver — Flower's too — unpacks event by event, in order). Celery turns that on
only when the worker has an event loop (prefork's hub) to flush from (``celery/worker/consumer/
events.py``: "This excludes eventlet/gevent, which should actually buffer"). :class:`BatchedTaskEvents`
turns it on for a green pool, with a greenlet that flushes :data:`FLUSH_AFTER_S` after the first event
buffered — so the job runs while its events are on their way, and events that arrive meanwhile (other
jobs', the next of this one) go in the same message.

**What stays.** Order: one buffer per worker, flushed in order, under the dispatcher's lock. Worker
events (heartbeats) are not buffered. A full buffer (Celery's ``buffer_limit``, 24) is sent at once by
Celery itself. A publish that fails (broker down) is kept in the dispatcher's outbound buffer — the
same one Celery keeps a failed single event in — and sent by the next flush or after the reconnect
(this step flushes before Celery's ``Events`` step replaces its dispatcher, and at shutdown before it
closes it). Events are fire-and-forget for Celery either way: a worker killed outright loses what it
had not sent, by at most :data:`FLUSH_AFTER_S` more than before.

**Log lines when stopping.** Under the gevent pool the worker's log lines are written in batches
(``workers/observe.py``: one ``gateway.upstream`` INFO line per attempt would be a write to ``up``'s pipe
each); :func:`install` also makes them go out at once from the moment the worker starts stopping, warm
or cold (``worker_shutting_down``), so an exit that does not run logging's shutdown loses none.
"""

from __future__ import annotations

from typing import Any

import gevent
from celery import Celery, bootsteps
from celery.signals import worker_shutting_down
from celery.worker.consumer.events import Events

from common.observability.logs import write_through

FLUSH_AFTER_S = 0.020   # how long the first buffered event waits for company (5 ms: 0.91x the CPU per call)


class SoonFlush:
    """Flushes a dispatcher's buffered events from a greenlet, ``delay`` seconds after the first one
    buffered since the last flush began (Celery calls :meth:`schedule` for every buffered event)."""

    def __init__(self, dispatcher: Any, delay: float = FLUSH_AFTER_S) -> None:
        self.dispatcher = dispatcher
        self.delay = delay
        self._pending: gevent.Greenlet | None = None

    def schedule(self) -> None:
        if self._pending is None:
            self._pending = gevent.spawn_later(self.delay, self.flush)

    def flush(self) -> None:
        """Send what is buffered now. Cleared first: an event buffered while this flush's publish is
        in flight schedules the next flush, which waits for this one (the dispatcher's lock)."""
        self._pending = None
        self.dispatcher.flush()


class BatchedTaskEvents(bootsteps.StartStopStep):
    """A consumer bootstep after Celery's ``Events``: buffers task events on a green pool's worker."""

    requires = (Events,)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.flusher: SoonFlush | None = None

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None or c.hub is not None or not getattr(c.pool, "is_green", False):
            return   # no events, or Celery buffers them itself (prefork's hub), or no greenlets to flush
        self.flusher = SoonFlush(dispatcher)
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.on_send_buffered = self.flusher.schedule

    def stop(self, c: Any) -> None:
        """Before a reconnect (Celery's ``Events`` then carries the outbound buffer over) and a stop."""
        if self.flusher is not None:
            self.flusher.flush()

    def shutdown(self, c: Any) -> None:
        """Before Celery's ``Events`` closes the dispatcher: events of jobs that ended during the stop."""
        self.stop(c)


def install(app: Celery) -> None:
    """Add :class:`BatchedTaskEvents` to ``app``'s worker consumer, and log lines written at once once
    the worker is stopping (idempotent)."""
    steps = app.steps["consumer"]
    if BatchedTaskEvents not in steps:
        steps.add(BatchedTaskEvents)
    worker_shutting_down.connect(_write_logs_through, weak=False, dispatch_uid="gateway-logs-through")


def _write_logs_through(**_: Any) -> None:
    write_through()
