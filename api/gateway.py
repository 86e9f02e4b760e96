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
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy.orm import sessionmaker

from api import observe
from api.budget_gate import BudgetGate, Plan
from api.dispatcher import ReplyDispatcher
from api.idempotency import FirstCall, IdemCall, IdemStore
from api.watch import REPEAT_POLL_S, JobWatch
from common.apikeys import ANONYMOUS
from common.budgets import Reservation
from common.contract import (
    EVENT_TTL_S,
    TERMINAL,
    Cancelled,
    Done,
    Expired,
    Failed,
    JobSpec,
    JobState,
    Mode,
    Result,
    Start,
)
from common.db import Job
from common.errors import (
    BudgetExceeded,
    GatewayError,
    InvalidRequest,
    JobCancelled,
    JobConflict,
    ModelNotFound,
    NotFound,
    OutcomeUnknown,
    ProviderUnavailable,
    QueueTimeout,
    QueueUnavailable,
)
from common.jobrows import DuplicateKey, JobRows
from common.jobs import JobStore, StreamEvent, new_job_id
from common.keyschema import KeyRecord
from common.limits import Limiter, Scope
from common.registry import Limits, Model, Provider
from common.routing import Trail, candidates, serving
from common.routing.observe import Router, place
from common.routing.ttft import RedisLatencyStats
from common.routing.virtual import VirtualRouter
from common.settings import Settings
from common.taskwire import task_message
from common.types import ChatRequest, EmbeddingsRequest

log = logging.getLogger(__name__)

FIRST_ROW_WAIT_S = 5.0   # how long an async repeat waits for the first call's row to be committed


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
    budget: Reservation | None = None   # what its budgets reserved (and had left) when it was queued


class Gateway:
    def __init__(self, settings: Settings, store: JobStore, sessions: sessionmaker,
                 dispatcher: ReplyDispatcher) -> None:
        self.settings = settings
        self.store = store
        # keyed: any key may be given limits of its own at any time (the admin API)
        self.limiter = Limiter(store, keyed=True)
        #: the calling key's own limits (set by create_app from the authenticated key; None: the YAML's)
        self.key_limits: Callable[[str | None], Limits | None] = lambda key_id: None
        self.sessions = sessions
        self.rows = JobRows(sessions)
        self.dispatcher = dispatcher
        self.idem = IdemStore(store.redis, store.prefix)
        self.virtual = VirtualRouter(settings.registry, RedisLatencyStats(store.redis, store.prefix))
        self.budgets = BudgetGate(store, sessions, settings.task_time_limit, served_by=self._served_by)
        self.router = Router(settings, store)
        self.stopping_at: float | None = None  # monotonic: when held callers are answered (begin_stop)

    def begin_stop(self, drain_s: float) -> None:
        """The process is stopping (SIGTERM): a held caller keeps waiting for its job up to ``drain_s``
        more seconds — it may still be served — and is then answered 503 (api/watch.py)."""
        if self.stopping_at is None:
            self.stopping_at = time.monotonic() + drain_s
            log.warning("stopping: %d held call(s) get up to %gs to be served (GATEWAY_DRAIN_TIMEOUT), "
                        "then a 503 with Retry-After", self.dispatcher.waiting, drain_s)
            self.dispatcher.wake_all()

    # resolution ---------------------------------------------------------------------------------
    def route(self, alias: str, key: KeyRecord | None = None) -> Route:
        """The route of the model ``alias``: 404 if unknown, 403 if ``key`` may not use it, 503 if its
        provider is not configured."""
        model = self.settings.registry.model(alias)
        if model is None:
            raise ModelNotFound(f"The model '{alias}' does not exist or you do not have access to it.",
                                param="model")
        if key is not None:
            key.check_model(alias)
        provider = self.settings.registry.provider_of(model)
        chain = [] if provider.routable else candidates(self.settings.registry, alias)
        if chain:  # its first deployment is not configured, another (or a fallback) is
            provider = self.settings.registry.providers[chain[0].provider]
        elif not provider.routable:
            raise ProviderUnavailable(f"model '{alias}' is served by provider '{provider.name}', which is "
                                      f"not configured: {provider.unroutable_reason}")
        return Route(model, provider)

    def route_of(self, spec: JobSpec) -> Route | None:
        """Where a job's live spec places it now (a job may move to another deployment after it was
        queued: workers/failover.py); None if the registry no longer knows its alias or provider."""
        registry = self.settings.registry
        model, provider = registry.models.get(spec.model), registry.providers.get(spec.provider)
        if model is None or provider is None:
            return None
        return Route(model.on(serving(model, spec.deployment, spec.provider)), provider)

    def limits_of_key(self, key_id: str) -> Limits:
        """The limits a key's calls count against: its own (admin API), else the YAML's key_limits."""
        return self.key_limits(key_id) or self.settings.registry.limits_of_key(key_id)
    def _served_by(self, model: Model) -> list[Model]:
        """``model`` as each deployment that may serve it would (its own and its fallbacks')."""
        registry = self.settings.registry
        served = [registry.models[c.alias].on(c.deployment) for c in candidates(registry, model.alias)]
        return served or [model]

    def placed(self, spec: JobSpec, request: ChatRequest | EmbeddingsRequest,
               route: Route) -> tuple[JobSpec, Route]:
        """The job's spec and route on the deployment routing picks (``common/routing``); an alias with
        one deployment and no fallbacks is left as it was (no Redis read)."""
        placement = place(self.router, route.model.alias, request)
        if placement is None:
            return spec, route
        candidate, decision = placement
        registry = self.settings.registry
        trail = Trail(route.model.alias, decision, fallback_used=candidate.fallback)
        return (replace(spec, model=candidate.alias, provider=candidate.provider, deployment=candidate.name,
                        trail=trail),
                Route(registry.models[candidate.alias].on(candidate.deployment),
                      registry.providers[candidate.provider]))

    def max_wait(self, header: str | None, body_value: Any, default: float) -> float:
        return parse_max_wait(body_value if body_value is not None else header, default,
                              self.settings.max_wait_limit)

    # synchronous calls --------------------------------------------------------------------------
    def start(self, request: ChatRequest | EmbeddingsRequest, route: Route, *, max_wait: float,
              api_key_id: str | None, idem: IdemCall | None = None,
              max_cost: Decimal | None = None) -> JobWatch:
        """Queue a call whose caller waits for it; the returned watch yields the job's events. With
        ``idem``, a repeat of a call already made under that key watches the first call's job. Its
        budgets reserve its worst case as it is queued (402 if one cannot; 400 above ``max_cost``)."""
        plan = self.budgets.plan(request, route.model, api_key_id, max_cost=max_cost, max_wait=max_wait)
        job_id = new_job_id()
        if idem is not None:
            first = self.idem.claim(idem, job_id)
            if first is not None:
                return self._attach(first, route, max_wait, api_key_id)
        waiter = self.dispatcher.register(job_id)
        try:
            spec, route = self.placed(self._spec(plan.request, route, Mode.SYNC, api_key_id), plan.request,
                                      route)
            self._enqueue(job_id, spec, route, plan, max_wait=max_wait, reply_to=self.dispatcher.channel,
                          ttl=max_wait + self.settings.task_time_limit + EVENT_TTL_S)
        except GatewayError:
            self.dispatcher.unregister(job_id)
            if idem is not None:
                self.idem.release(idem, job_id)
            raise
        watch = JobWatch(self, job_id, route, waiter, max_wait, api_key_id, idem=idem)
        watch.reservation = plan.reservation
        return watch

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
             api_key_id: str | None, idem: IdemCall | None = None,
             max_cost: Decimal | None = None) -> Outcome:
        """Queue the call and hold until it settles; past ``max_wait`` in line raise QueueTimeout.
        Every error raised about the job carries its id."""
        watch = self.start(request, route, max_wait=max_wait, api_key_id=api_key_id, idem=idem,
                           max_cost=max_cost)
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
            observe.note_outcome(event.meta)
            return Outcome(watch.job_id, event.result, event.meta, watch.reservation)
        if isinstance(event, Failed):
            raise event.exception()
        if isinstance(event, Expired):
            provider = watch.current_route().provider   # where it waited last (it may have moved)
            raise QueueTimeout(event.message, retry_after=self.retry_after(provider, 1.0, watch.api_key_id))
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

    def _enqueue(self, job_id: str, spec: JobSpec, route: Route, plan: Plan, **job: Any) -> None:
        """Record the job, reserve its budgets (``plan``) and push its Celery message onto
        ``llm.<provider>`` in one Redis step."""
        queue_name = self.settings.queue_for(route.provider.name)
        spec = observe.note_job(job_id, spec)
        try:
            self.budgets.create(plan, lambda budget: self.store.create(
                job_id, spec, queue=self.settings.queue_key(route.provider.name),
                message=task_message(job_id, queue_name), budget=budget, **job))
        except redis.RedisError as exc:
            log.error("job %s: broker unavailable: %s", job_id, exc)
            raise QueueUnavailable("the job queue is unavailable; nothing was queued, retry shortly",
                                   retry_after=1) from None

    # async jobs ---------------------------------------------------------------------------------
    def submit(self, request: ChatRequest, route: Route, *, max_wait: float, api_key_id: str | None,
               idem: IdemCall | None = None, max_cost: Decimal | None = None) -> tuple[Job, bool]:
        """Accept an async job: durable row first, then live state, then the queue. Returns the job and
        whether it is new — False for a repeat under an Idempotency-Key (the first call's job; found in
        Redis, else by the key kept in its Postgres row)."""
        if request.stream:
            raise InvalidRequest("async jobs return a whole completion; do not set 'stream'", param="stream")
        plan = self.budgets.plan(request, route.model, api_key_id, max_cost=max_cost, max_wait=max_wait)
        job_id = new_job_id()
        if idem is not None:
            first = self.idem.claim(idem, job_id)
            if first is not None:
                return self._first_job(first.job_id), False
        spec, route = self.placed(self._spec(plan.request, route, Mode.ASYNC, api_key_id), plan.request,
                                  route)
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
            self._enqueue(job_id, spec, route, plan, max_wait=max_wait, reply_to="",
                          ttl=max_wait + EVENT_TTL_S * 24)
        except (QueueUnavailable, BudgetExceeded) as exc:  # its row says why it never ran
            self.rows.settle(job_id, JobState.FAILED, error=exc.to_dict())
            exc.job_id = job_id
            raise
        return job, True

    def _spec(self, request: ChatRequest | EmbeddingsRequest, route: Route, mode: Mode,
              api_key_id: str | None) -> JobSpec:
        """The job's spec, with its key's own limits: the workers admit it by them, no key lookup."""
        return JobSpec.of(request, mode=mode, model=route.model.alias, provider=route.provider.name,
                          api_key_id=api_key_id, key_limits=self.key_limits(api_key_id))

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

