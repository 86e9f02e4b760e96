"""What the API does with a validated call, whatever protocol it arrived in.

:class:`Gateway` resolves the model, creates the job (Redis; plus Postgres for async jobs), sends it
to the provider's Celery queue and — for a synchronous call — holds the caller until the job's
result arrives through the :class:`~api.dispatcher.ReplyDispatcher`, or its ``max_wait`` passes.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy.orm import sessionmaker

from api.dispatcher import RESYNC, Delivery, ReplyDispatcher
from api.errors import QUEUE_DOWN
from api.idempotency import FirstCall, IdemCall, IdemStore
from common.apikeys import ANONYMOUS
from common.contract import (
    EVENT_TTL_S,
    TERMINAL,
    Cancelled,
    Chunk,
    Done,
    Expired,
    Failed,
    JobEvent,
    JobSpec,
    JobState,
    Mode,
    Result,
    Start,
)
from common.db import Job
from common.errors import (
    GatewayError,
    InvalidRequest,
    JobCancelled,
    JobConflict,
    JobTimeout,
    ModelNotFound,
    NotFound,
    OutcomeUnknown,
    ProviderUnavailable,
    QueueTimeout,
    QueueUnavailable,
)
from common.jobrows import DuplicateKey, JobRows
from common.jobs import JobStore, StreamEvent, new_job_id
from common.limits import Limiter, Scope
from common.registry import Model, Provider
from common.settings import Settings
from common.taskwire import task_message
from common.types import ChatRequest, EmbeddingsRequest

log = logging.getLogger(__name__)

SAFETY_POLL_S = 30.0     # re-read the job's stream this often even without a notification
FIRST_ROW_WAIT_S = 5.0   # how long an async repeat waits for the first call's row to be committed
REPEAT_POLL_S = 0.25     # how often an Idempotency-Key repeat re-reads the first call's job stream


@dataclass(frozen=True)
class Route:
    model: Model
    provider: Provider


@dataclass(frozen=True)
class Outcome:
    """A settled job as the protocol layer renders it."""

    job_id: str
    result: dict[str, Any]
    meta: dict[str, Any]


class Gateway:
    def __init__(self, settings: Settings, store: JobStore, sessions: sessionmaker,
                 dispatcher: ReplyDispatcher) -> None:
        self.settings = settings
        self.store = store
        self.limiter = Limiter(store, keyed=bool(settings.registry.key_limits))
        self.sessions = sessions
        self.rows = JobRows(sessions)
        self.dispatcher = dispatcher
        self.idem = IdemStore(store.redis, store.prefix)

    # resolution ---------------------------------------------------------------------------------
    def route(self, alias: str) -> Route:
        model = self.settings.registry.model(alias)
        if model is None:
            raise ModelNotFound(f"The model '{alias}' does not exist or you do not have access to it.",
                                param="model")
        provider = self.settings.registry.provider_of(model)
        if not provider.routable:
            raise ProviderUnavailable(f"model '{alias}' is served by provider '{provider.name}', which is "
                                      f"not configured: {provider.unroutable_reason}")
        return Route(model, provider)

    def max_wait(self, header: str | None, body_value: Any, default: float) -> float:
        return parse_max_wait(body_value if body_value is not None else header, default,
                              self.settings.max_wait_limit)

    # synchronous calls --------------------------------------------------------------------------
    def start(self, request: ChatRequest | EmbeddingsRequest, route: Route, *, max_wait: float,
              api_key_id: str | None, idem: IdemCall | None = None) -> JobWatch:
        """Queue a call whose caller waits for it; the returned watch yields the job's events. With
        ``idem``, a repeat of a call already made under that key watches the first call's job."""
        job_id = new_job_id()
        if idem is not None:
            first = self.idem.claim(idem, job_id)
            if first is not None:
                return self._attach(first, route, max_wait, api_key_id)
        waiter = self.dispatcher.register(job_id)
        try:
            self._enqueue(job_id, _spec(request, route, Mode.SYNC, api_key_id), route, max_wait=max_wait,
                          reply_to=self.dispatcher.channel,
                          ttl=max_wait + self.settings.task_time_limit + EVENT_TTL_S)
        except GatewayError:
            self.dispatcher.unregister(job_id)
            if idem is not None:
                self.idem.release(idem, job_id)
            raise
        return JobWatch(self, job_id, route, waiter, max_wait, api_key_id, idem=idem)

    def _attach(self, first: FirstCall, route: Route, max_wait: float, api_key_id: str | None) -> JobWatch:
        """A watch on the job of an earlier call under the same Idempotency-Key: its recorded outcome,
        or its events re-read from its stream (they are published to the first call's API process, so
        this watch polls; it never withdraws or aborts a job that is not its own)."""
        watch = JobWatch(self, first.job_id, route, queue.SimpleQueue(), max_wait, api_key_id)
        watch.owner = False
        watch.poll_s = REPEAT_POLL_S
        if first.outcome is not None and not self.store.redis.exists(self.store.events_key(first.job_id)):
            if isinstance(first.outcome, Done):
                raise JobConflict(f"the streamed answer of job {first.job_id} was delivered and its chunks "
                                  "are no longer kept; send a new request with a new Idempotency-Key")
            watch.replay(first.outcome)
        return watch

    def call(self, request: ChatRequest | EmbeddingsRequest, route: Route, *, max_wait: float,
             api_key_id: str | None, idem: IdemCall | None = None) -> Outcome:
        """Queue the call and hold until it settles; past ``max_wait`` in line raise QueueTimeout.
        Every error raised about the job carries its id."""
        watch = self.start(request, route, max_wait=max_wait, api_key_id=api_key_id, idem=idem)
        try:
            while True:
                event = watch.next()
                assert event is not None
                outcome = self.final(watch, event)
                if outcome is not None:
                    return outcome
        except BaseException as exc:
            if isinstance(exc, GatewayError):
                exc.job_id = exc.job_id or watch.job_id
            if not watch.settled:  # its caller is answered without the job's result: never run it again
                watch.give_up()
            raise
        finally:
            watch.close()

    def final(self, watch: JobWatch, entry: StreamEvent) -> Outcome | None:
        """The outcome a final event carries (an error event raises it); None for a chunk."""
        event = entry.event
        if isinstance(event, Result):
            return Outcome(watch.job_id, event.result, event.meta)
        if isinstance(event, Failed):
            raise event.exception()
        if isinstance(event, Expired):
            raise QueueTimeout(event.message,
                               retry_after=self.retry_after(watch.route.provider, 1.0, watch.api_key_id))
        if isinstance(event, Cancelled):
            raise JobCancelled(event.message)
        return None

    def start_in(self, provider: Provider, ahead: int) -> float | None:
        """Seconds until a job with ``ahead`` jobs before it in ``provider``'s line may start.

        * Where the provider's RPM window is what holds the line back: when that job's slot frees
          (:meth:`Limiter.window_start_in` — the line moves once per window).
        * Otherwise: ``ahead`` divided by the rate at which the provider's workers settled jobs over
          the last minute; None when nothing settled in that minute (nothing to go by).

        Checked against measurement in bench/limits.py (Retry-After accuracy)."""
        if provider.limits.rpm:
            windowed = self.limiter.window_start_in(provider.name, provider.limits.rpm, ahead)
            if windowed is not None:
                return windowed
        rate = self.store.completion_rate(provider.name)
        return ahead / rate if rate > 0 else None

    def retry_after(self, provider: Provider, waited: float, api_key_id: str | None = None) -> int:
        """Seconds until a retry, joining at the back, is likely to start: :meth:`start_in` behind
        every job now waiting (in the provider's line at the workers plus the broker queue); with no
        completions to go by, the time this call already waited is the honest lower bound. Never
        less than the time the limits themselves say nothing can start: the head's next window slot
        or day, or the caller's key's own quota (a key at its daily limit is told when the next UTC
        day starts)."""
        depth = self.queue_depth(provider) + self.limiter.line_length(provider.name)
        estimate = self.start_in(provider, depth)
        estimate = max(waited if estimate is None else estimate,
                       self.limiter.blocked_for(provider.name, api_key_id or "-"))
        return int(min(max(math.ceil(estimate), 1), 86_400))

    def limits(self) -> dict[str, Any]:
        """Each provider's limits, current use, line, broker queue depth and cooldown."""
        out: dict[str, Any] = {}
        for name, provider in self.settings.registry.providers.items():
            scopes = [Scope(name, provider.limits)] + [
                Scope.of_model(name, alias, m.limits) for alias, m in self.settings.registry.models.items()
                if m.provider == name and m.limits.any]
            entry: dict[str, Any] = {"routable": provider.routable, "queue": self.settings.queue_for(name),
                                     "queue_depth": self.queue_depth(provider),
                                     "completions_per_s": round(self.store.completion_rate(name), 3)}
            entry.update(self.limiter.snapshot(name, scopes))
            out[name] = entry
        return out

    def position(self, job: Job) -> dict[str, Any]:
        """Where a queued job stands: its place in the provider's line (None while it is still in the
        broker queue, not yet held by a worker) and when it may start (:meth:`start_in`)."""
        provider = self.settings.registry.providers[job.provider]
        rank = self.limiter.position(job.provider, job.id)
        ahead = rank if rank is not None else self.queue_depth(provider)
        start = self.start_in(provider, ahead)
        return {"position": rank, "ahead": ahead,
                "estimated_start_s": None if start is None else round(start, 1)}

    def queue_depth(self, provider: Provider) -> int:
        return int(self.store.redis.llen(self.settings.queue_key(provider.name)))

    def _enqueue(self, job_id: str, spec: JobSpec, route: Route, **job: Any) -> None:
        """Record the job and push its Celery message onto ``llm.<provider>`` in one Redis step."""
        queue_name = self.settings.queue_for(route.provider.name)
        try:
            self.store.create(job_id, spec, queue=self.settings.queue_key(route.provider.name),
                              message=task_message(job_id, queue_name), **job)
        except redis.RedisError as exc:
            log.error("job %s: broker unavailable: %s", job_id, exc)
            raise QueueUnavailable("the job queue is unavailable; nothing was queued, retry shortly",
                                   retry_after=1) from None

    # async jobs ---------------------------------------------------------------------------------
    def submit(self, request: ChatRequest, route: Route, *, max_wait: float, api_key_id: str | None,
               idem: IdemCall | None = None) -> tuple[Job, bool]:
        """Accept an async job: durable row first, then live state, then the queue. Returns the job and
        whether it is new — False for a repeat under an Idempotency-Key (the first call's job; found in
        Redis, else by the key kept in its Postgres row)."""
        if request.stream:
            raise InvalidRequest("async jobs return a whole completion; do not set 'stream'", param="stream")
        job_id = new_job_id()
        if idem is not None:
            first = self.idem.claim(idem, job_id)
            if first is not None:
                return self._first_job(first.job_id), False
        spec = _spec(request, route, Mode.ASYNC, api_key_id)
        try:
            job = self.rows.add(job_id, spec, max_wait=max_wait, idempotency=idem.row() if idem else None)
        except DuplicateKey:
            assert idem is not None
            return self._adopt(idem, job_id), False
        except Exception:
            if idem is not None:
                self.idem.release(idem, job_id)
            raise
        try:
            self._enqueue(job_id, spec, route, max_wait=max_wait, reply_to="",
                          ttl=max_wait + EVENT_TTL_S * 24)
        except QueueUnavailable as exc:
            self.rows.settle(job_id, JobState.FAILED, error=exc.to_dict())
            raise
        return job, True

    def _first_job(self, job_id: str) -> Job:
        """The row of the first call's job. Its claim precedes its row by a moment (a concurrent repeat
        waits up to FIRST_ROW_WAIT_S for it); a claim whose row never came means the first call
        failed and Redis could not be told."""
        give_up = time.monotonic() + FIRST_ROW_WAIT_S
        while (job := self.rows.get(job_id)) is None:
            if time.monotonic() >= give_up:
                raise OutcomeUnknown.for_job(job_id, "the first call under this Idempotency-Key was not "
                                             "recorded")
            time.sleep(0.05)
        return job

    def _adopt(self, idem: IdemCall, claimed: str) -> Job:
        """Redis lost the key's record but Postgres holds a job under it: that job is the answer (422
        if it was another body)."""
        job = self.rows.by_idempotency_key(idem.owner, idem.key)
        if job is None:
            raise OutcomeUnknown.for_job(claimed, "its Idempotency-Key is held by a job that vanished")
        idem.check(idem.endpoint, job.idempotency_body or "")
        self.idem.adopt(idem, job.id)
        return job

    def job(self, job_id: str, api_key_id: str | None) -> Job:
        job = self.rows.get(job_id)
        # only its owner sees a job; rows from before owners existed (NULL) are anonymous's
        if job is None or (job.api_key_id or ANONYMOUS) != (api_key_id or ANONYMOUS):
            raise NotFound(f"no job with id '{job_id}'", param="id", code="job_not_found")
        return job

    def cancel(self, job_id: str, api_key_id: str | None) -> Job:
        job = self.job(job_id, api_key_id)
        if job.status in TERMINAL:
            raise JobConflict(f"job '{job_id}' already {job.status}")
        state = self.store.withdraw(job_id, JobState.CANCELLED)
        if state not in (JobState.CANCELLED, Start.MISSING):
            raise JobConflict(f"job '{job_id}' is {state} and can no longer be cancelled")
        return self.rows.cancelled(job_id)


class JobWatch:
    """A waiting caller's view of its job: the job's events in order, each exactly once (whether it
    came by pubsub or by re-reading the job's stream), until the job settles.

    Past the job's max_wait in line :meth:`next` withdraws it and raises :class:`QueueTimeout`; if a
    worker claimed it first, the watch keeps going (a started job is never reported as expired)."""

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

    def _limit(self) -> float:
        """Until when this watch waits for news: the job's max_wait while it may still be queued, the
        task time limit beyond once it runs or while Redis cannot say which it is."""
        unsure = self.running or self._backoff > 0 or not self.owner
        return self.deadline + (self.gateway.settings.task_time_limit + 30 if unsure else 0)

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
                               retry_after=self.gateway.retry_after(self.route.provider, 1.0,
                                                                    self.api_key_id))
        if state == JobState.CANCELLED:
            raise JobCancelled(f"the first call under this Idempotency-Key (job {self.job_id}) was cancelled")

    def _take(self, entries: list[StreamEvent]) -> None:
        for entry in entries:
            if entry.stream_id and _stream_order(entry.stream_id) > _stream_order(self._last_id):
                self._last_id = entry.stream_id
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
                               retry_after=self.gateway.retry_after(self.route.provider, self.max_wait,
                                                                    self.api_key_id))
        if state is Start.MISSING:
            raise _job_lost(self.job_id)
        self.running = True  # a worker claimed it just in time: it will run, so keep waiting

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


def parse_max_wait(raw: Any, default: float, limit: float) -> float:
    """The caller's max_wait in seconds (``max_wait`` body field, else ``x-gateway-max-wait`` header)."""
    if raw is None:
        return default
    if isinstance(raw, bool):
        raise InvalidRequest("max_wait must be a number of seconds", param="max_wait")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidRequest(f"max_wait must be a number of seconds, got {raw!r}", param="max_wait") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest("max_wait must be a positive number of seconds", param="max_wait")
    if value > limit:
        raise InvalidRequest(f"max_wait may be at most {limit:g} seconds", param="max_wait")
    return value


def _spec(request: ChatRequest | EmbeddingsRequest, route: Route, mode: Mode,
          api_key_id: str | None) -> JobSpec:
    return JobSpec.of(request, mode=mode, model=route.model.alias, provider=route.provider.name,
                      api_key_id=api_key_id)
