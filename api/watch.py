"""A waiting caller's view of its job (:class:`JobWatch`): the job's events in order, each once,
whether they came by pubsub or by re-reading the job's stream, until the job settles or the caller's
max_wait passes. Built by :meth:`api.gateway.Gateway.start`."""


from __future__ import annotations

import logging
import math
import queue
import time
from collections import deque
from typing import TYPE_CHECKING

import redis

from api.dispatcher import RESYNC, Delivery
from api.errors import QUEUE_DOWN
from api.idempotency import IdemCall
from common.budgets import Reservation
from common.contract import (
    Cancelled,
    Chunk,
    Expired,
    JobEvent,
    JobSpec,
    JobState,
    Start,
)
from common.errors import (
    GatewayStopping,
    JobCancelled,
    JobTimeout,
    OutcomeUnknown,
    QueueTimeout,
)
from common.jobs import StreamEvent

if TYPE_CHECKING:
    from api.gateway import Gateway, Route

log = logging.getLogger(__name__)

SAFETY_POLL_S = 30.0     # re-read the job's stream this often even without a notification
STOP_RETRY_AFTER_S = 5.0  # Retry-After for a call withdrawn because its API process stopped
REPEAT_POLL_S = 0.25     # how often an Idempotency-Key repeat re-reads the first call's job stream


class JobWatch:
    """A waiting caller's view of its job: the job's events in order, each exactly once (whether it
    came by pubsub or by re-reading the job's stream), until the job settles.

    Past the job's max_wait in line :meth:`next` withdraws it and raises :class:`QueueTimeout`; if a
    worker claimed it first, the watch keeps going (a started job is never reported as expired)."""

    reservation: Reservation | None = None   # its budgets' reservation (api/budget_gate.py), if any
    live_spec: JobSpec | None = None          # the job's spec as :meth:`current_route` last read it

    def __init__(self, gateway: Gateway, job_id: str, route: Route, waiter: queue.SimpleQueue[Delivery],
                 max_wait: float, api_key_id: str | None = None, idem: IdemCall | None = None) -> None:
        self.gateway = gateway
        self.idem = idem
        self.job_id = job_id
        self.route = route
        self.api_key_id = api_key_id
        self.max_wait = max_wait
        self.deadline = time.monotonic() + max_wait
        self.running = False
        self.settled = False   # a final event arrived
        self._waiter = waiter
        self._last_id = "0-0"
        self._read_at = time.monotonic()
        self._pending: deque[StreamEvent] = deque()
        self._backoff = 0.0           # > 0 while Redis is unreachable
        self._retry_at = math.inf     # when to read again after a lost connection
        self.poll_s = SAFETY_POLL_S   # re-read the stream this often without a notification
        self.owner = True             # False: another request's job (an idempotent repeat) — never withdrawn

    def current_route(self) -> Route:
        """Where the job is now. It may have moved to another deployment since it was queued
        (workers/failover.py), so its line position and a Retry-After follow its live spec in Redis;
        the route it was last seen on while Redis cannot say."""
        try:
            spec = self.gateway.store.spec(self.job_id)
        except QUEUE_DOWN:
            return self.route
        route = None if spec is None else self.gateway.route_of(spec)
        if route is not None:
            self.route, self.live_spec = route, spec
        return self.route

    def next(self, timeout: float | None = None) -> StreamEvent | None:
        """The next event; None if ``timeout`` seconds pass first (None = wait as long as the job may).

        A lost Redis connection is not the job's outcome: the watch keeps re-reading the job's stream
        with backoff (the dispatcher also resubscribes and says so) and raises :class:`OutcomeUnknown`
        only if Redis stays unreachable past the longest the job may take."""
        give_up = math.inf if timeout is None else time.monotonic() + timeout
        while not self._pending:
            limit = self._limit()
            now = time.monotonic()
            wait = min(self.poll_s, limit - now, give_up - now, self._retry_at - now)
            try:
                self._wait_once(max(0.0, wait), limit)
                if self._pending:
                    break
                now = time.monotonic()
                if now >= limit:
                    self._expire()
            except QUEUE_DOWN as exc:
                self._redis_down(exc)
            if time.monotonic() >= give_up and not self._pending:
                return None
        return self._pending.popleft()

    def ready(self) -> StreamEvent | None:
        """The next event if it is here already (no waiting; Redis is read only after a resync), else None."""
        if not self._pending:
            try:
                event = self._waiter.get_nowait()
            except queue.Empty:
                return None
            self._take(self._reread() if event is RESYNC else [event])  # type: ignore[list-item]
        return self._pending.popleft() if self._pending else None

    def _limit(self) -> float:
        """Until when this watch waits for news: the job's max_wait while it may still be queued, the
        task time limit beyond once it runs or while Redis cannot say which it is."""
        unsure = self.running or self._backoff > 0 or not self.owner
        limit = self.deadline + (self.gateway.settings.task_time_limit + 30 if unsure else 0)
        stopping_at = self.gateway.stopping_at  # the process stops: its drain time bounds every wait
        return limit if stopping_at is None else min(limit, stopping_at)

    def _wait_once(self, wait: float, limit: float) -> None:
        try:
            event = self._waiter.get(timeout=wait)
            self._take(self._reread() if event is RESYNC else [event])  # type: ignore[list-item]
        except queue.Empty:
            now = time.monotonic()
            if now - self._read_at >= self.poll_s or now >= limit or now >= self._retry_at:
                self._take(self._reread())

    def _redis_down(self, exc: Exception) -> None:
        """Redis is unreachable: read again after a backoff; past the job's last possible moment the
        gateway cannot know the outcome."""
        if time.monotonic() >= self.deadline + self.gateway.settings.task_time_limit + 30:
            raise OutcomeUnknown.for_job(self.job_id, "the gateway's queue (Redis) was unreachable "
                                         "until the call's deadline") from None
        self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
        self._retry_at = time.monotonic() + self._backoff
        log.warning("job %s: Redis unreachable while waiting (%s); reading again in %.1fs",
                    self.job_id, type(exc).__name__, self._backoff)

    def _reread(self) -> list[StreamEvent]:
        self._read_at = time.monotonic()
        self._retry_at = math.inf
        events = self.gateway.store.read_events(self.job_id, self._last_id)
        self._backoff = 0.0
        if not events and not self.owner:
            self._check_withdrawn()
        elif not events and not self.gateway.store.exists(self.job_id):
            raise _job_lost(self.job_id)
        return events

    def _check_withdrawn(self) -> None:
        """For a watch on another request's job: a withdrawal leaves no event in the stream (its
        owner answered it directly), so read the job's state — expired or cancelled is the answer."""
        state = self.gateway.store.state(self.job_id).get("state")
        if state is None:
            raise _job_lost(self.job_id)
        if state == JobState.EXPIRED:
            raise QueueTimeout(f"the first call under this Idempotency-Key (job {self.job_id}) waited in the "
                               "queue past its max_wait and was withdrawn; it never ran",
                               retry_after=self.gateway.retry_after(self.current_route().provider, 1.0,
                                                                    self.api_key_id))
        if state == JobState.CANCELLED:
            raise JobCancelled(f"the first call under this Idempotency-Key (job {self.job_id}) was cancelled")

    def _take(self, entries: list[StreamEvent]) -> None:
        last = _stream_order(self._last_id)
        for entry in entries:
            if entry.stream_id and (order := _stream_order(entry.stream_id)) > last:
                self._last_id, last = entry.stream_id, order
                if isinstance(entry.event, Chunk):
                    self.running = True
                elif self.idem is not None:
                    self._keep_outcome(entry.event)
                self.settled = self.settled or entry.event.final
                self._pending.append(entry)

    def _keep_outcome(self, event: JobEvent) -> None:
        """Record the final event for the call's Idempotency-Key — unless the job never ran (it
        expired in line or was withdrawn): then the key is freed, so that a retry runs the call."""
        assert self.idem is not None
        if isinstance(event, Expired | Cancelled):
            self.gateway.idem.release(self.idem, self.job_id)
        else:
            self.gateway.idem.record(self.idem, event)

    def replay(self, event: JobEvent) -> None:
        """Answer with the final event recorded for an Idempotency-Key (the job's stream is gone)."""
        self._last_id = REPLAYED
        self._pending.append(StreamEvent(REPLAYED, event))

    def _expire(self) -> None:
        stopping_at = self.gateway.stopping_at
        if stopping_at is not None and time.monotonic() >= stopping_at:
            self._stopped()
        if self.running or not self.owner:
            self.give_up()
            raise JobTimeout("the job did not finish within the task time limit")
        state = self.gateway.store.withdraw(self.job_id, JobState.EXPIRED)
        if state is JobState.EXPIRED:
            if self.idem is not None:
                self.gateway.idem.release(self.idem, self.job_id)  # it never ran: a retry may run it
            raise QueueTimeout(f"the request waited {self.max_wait:g}s in the queue for "
                               f"'{self.route.model.alias}' without a free slot and was withdrawn; "
                               "retry later or raise max_wait",
                               retry_after=self.gateway.retry_after(self.current_route().provider,
                                                                    self.max_wait, self.api_key_id))
        if state is Start.MISSING:
            raise _job_lost(self.job_id)
        self.running = True  # a worker claimed it just in time: it will run, so keep waiting

    def _stopped(self) -> None:
        """This API process stops and its drain time is up: a job still queued is withdrawn — it never
        runs, so the caller may retry (503 ``gateway_stopping`` with Retry-After); one already running
        is abandoned (never run again) and its caller cannot learn how it ends (503 ``outcome_unknown``)."""
        state = self.gateway.store.abandon(self.job_id, JobState.CANCELLED) if self.owner else None
        if state is JobState.CANCELLED and not self.running:
            if self.idem is not None:
                self.gateway.idem.release(self.idem, self.job_id)  # it never ran: a retry may run it
            raise GatewayStopping("the gateway is restarting and this call had not started yet; it was "
                                  "withdrawn and will not run: retry it", retry_after=STOP_RETRY_AFTER_S)
        raise OutcomeUnknown.for_job(self.job_id, "the gateway stopped while the call was running")

    def abandon(self) -> None:
        """The caller left: withdraw the job if it waits, or make its worker abort the upstream call
        (not if the job is another request's: an Idempotency-Key repeat only watches it)."""
        if self.owner:
            self.gateway.store.abort(self.job_id)

    def give_up(self) -> None:
        """The caller is answered without the job's result (504, 503, an error, the process stopping):
        :meth:`JobStore.abandon` it, so that it never runs (again) for nobody. Best effort: if Redis is
        unreachable the caller still gets its answer (the job then runs at most once more). A watch
        that does not own its job (an Idempotency-Key repeat) leaves it alone."""
        if not self.owner:
            return
        try:
            self.gateway.store.abandon(self.job_id, JobState.CANCELLED)
        except (redis.RedisError, OSError) as exc:
            log.warning("job %s: could not mark it abandoned: %s", self.job_id, exc)

    def close(self) -> None:
        self.gateway.dispatcher.unregister(self.job_id)


def _job_lost(job_id: str) -> OutcomeUnknown:
    """Redis no longer knows the job (it restarted without persistence, or was wiped): the caller must
    not wait on a job nobody may run, nor be told it failed — a worker may have run it already.
    (Async jobs are queued again from Postgres: ``workers/reconciler.py``.)"""
    return OutcomeUnknown.for_job(job_id, "the gateway's queue lost its state (Redis restarted or was "
                                  "wiped) before the outcome was recorded")


REPLAYED = "9999999999999-0"  # a replayed outcome's stream id: nothing after it is read


def _stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
