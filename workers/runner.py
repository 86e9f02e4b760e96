"""Running one job: claim it, call its provider, record what it cost, settle it, tell the waiter.

:class:`JobRunner` holds a worker process's collaborators (built once by :func:`build_runner`) and
is what the Celery task calls. The path of a job::

    run ─► spec (read once) ─► admit (limited: wait in line, claim with the permits) | claim
        ─► execute ─► call upstream, retry / wait / fail as workers/policy.py decides ─► settle

Every exit goes through :meth:`JobRunner._settle`, the one settle path: it writes the async job's
row (with the usage row, one transaction), then settles the live state and emits the final event
(with a sync call's usage row, one Redis step). Each job is settled exactly once and its lease and
permits released.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import NamedTuple

import redis
from sqlalchemy.exc import SQLAlchemyError

from common.budgets import to_units
from common.contract import (
    EVENT_TTL_S,
    Done,
    Expired,
    Failed,
    JobEvent,
    JobSpec,
    JobState,
    Result,
    Start,
    state_or_start,
    unrun_event,
)
from common.errors import (
    AuthenticationFailed,
    ClientGone,
    ExceedsLimit,
    GatewayError,
    InternalError,
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
)
from common.jobrows import JobRows, spec_of
from common.jobs import Claim, JobStore
from common.registry import Model
from common.routing.ttft import RedisLatencyStats
from common.settings import Settings
from common.tokens import reservation
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest
from common.upstream_health import UpstreamHealth, scrub
from workers.adapters.base import Adapter
from workers.admission import AdmissionControl, StopAdmitting, scopes_for
from workers.aftercall import AfterCall, Success
from workers.failover import Failover, Moved, WaitedOut
from workers.jobrun import JobRun, money, usage_row
from workers.leases import LeaseKeeper
from workers.observe import observer
from workers.partial import partial_bill
from workers.policy import Action, Decision, decide, may_move, reached_upstream
from workers.relay import relay_stream
from workers.settle import Settlement, Settler, billed_charge
from workers.usage import ATTEMPT_LOST, UsageLedger

log = logging.getLogger(__name__)


LEASE_TTL_S = 10.0  # a running job's lease (renewed every third): a dead worker's job is free this soon
BUSY_POLL_S = 1.0   # how often a delivery of a job whose lease is alive looks whether it lapsed


class Answered(NamedTuple):
    """The upstream's answer to one job's run: its last try's latency and usage-row id, and whether
    that try was a half-open probe (its breaker heard the success already)."""

    response: ChatResponse
    latency_ms: int
    call_id: str
    probe: bool


class JobRunner:
    def __init__(self, settings: Settings, store: JobStore, rows: JobRows, ledger: UsageLedger,
                 adapters: dict[str, Adapter], admission: AdmissionControl,
                 revoked: Callable[[str | None], bool] = lambda key_id: False) -> None:
        self.settings = settings
        self.store = store
        self.rows = rows
        self.ledger = ledger
        self.adapters = adapters
        self.admission = admission
        self.revoked = revoked   # whether a job's API key was revoked since it was accepted
        self.settler = Settler(settings, store, rows, ledger)
        self.ttft = RedisLatencyStats(store.redis, store.prefix)
        self.upstream = UpstreamHealth(store.redis, settings.key_prefix)
        self.failover = Failover(settings, store)
        self.aftercall = AfterCall(store.redis, self.upstream, self.failover, self.ttft)
        self.observe = observer(settings)
        self.lease_ttl = job_lease_ttl(settings)
        self.leases = LeaseKeeper(store, self.lease_ttl)   # renews the running jobs' leases
        registry = settings.registry
        self.limits_configured = (any(p.limits.any for p in registry.providers.values())
                                  or any(m.limits.any for m in registry.models.values())
                                  or bool(registry.key_limits))
        self.running: dict[str, str] = {}  # job id → execution of the jobs this process runs now

    def run(self, job_id: str) -> str:
        """Run a delivered job; returns what happened (for logs and tests). Raises
        :class:`~workers.admission.StopAdmitting` if the process is stopping before the job started."""
        if self.admission.stopping:
            raise StopAdmitting(f"job {job_id} not started: this worker is stopping")
        execution = f"{os.getpid()}:{secrets.token_hex(4)}"
        self.observe.delivered(job_id)
        job: JobRun | None = None
        if self.limits_configured:  # learn which limits this job counts against before it may start
            spec = self.store.spec(job_id)
            if spec is None:
                return self._recover_missing(job_id)
            job = self._job(job_id, execution, spec)
        if job is not None and job.scopes:  # wait in the provider's line; admission claims atomically
            claim = self._admit(job)
        else:  # no limits apply: claim straight away (returning the spec unless we read it: one round trip)
            claim = self.store.claim(job_id, execution, self.lease_ttl, with_spec=job is None,
                                     holder=self.admission.proc_id)
        if claim.outcome is Start.LIMITED:  # its key has limits of its own: wait in line for them
            assert claim.spec is not None
            job = self._job(job_id, execution, claim.spec)
            claim = self._admit(job)
        if claim.outcome is Start.MISSING:
            return self._recover_missing(job_id)
        if claim.outcome is Start.EXPIRED:
            spec = job.spec if job is not None else self.store.spec(job_id)
            expired = unrun_event(JobState.EXPIRED,
                                  "the job waited longer than its max_wait and was withdrawn")
            self.settler.settle(job_id, execution, spec, Settlement(JobState.EXPIRED, expired),
                                state_set=True)
            return claim.outcome
        if claim.outcome is Start.ORPHANED:  # the claim cancelled it: nobody can use it (job.lua)
            spec = job.spec if job is not None else self.store.spec(job_id)
            if spec is not None:
                return self._cancel_unrun(self._job(job_id, execution, spec), claim.lost_attempt)
        if claim.outcome is Start.BUSY and self._outlived_lease(job_id):
            return self.run(job_id)  # its holder died (a cold shutdown put its message back at once)
        if claim.outcome is not Start.RUN:
            return claim.outcome  # busy (another worker runs it), already settled, or failed in line
        if job is None:
            assert claim.spec is not None
            job = self._job(job_id, execution, claim.spec)
        self.leases.hold(job_id, execution, renew_permit=lambda: self._renew_permit(job))
        self.running[job_id] = execution
        try:
            return self._execute(job, claim.attempt, claim.queue_wait_s)
        finally:
            self.running.pop(job_id, None)
            self.leases.release(job_id, execution)
            self._release(job, None)

    def _job(self, job_id: str, execution: str, spec: JobSpec) -> JobRun:
        model, deployment = self.failover.home(spec)
        provider = self.settings.registry.providers[deployment.provider]
        key = spec.api_key_id or "-"
        scopes = scopes_for(self.settings.registry, model, provider, key, spec.own_limits())
        request = spec.canonical_request()
        return JobRun(job_id, execution, spec, model, provider, key, scopes, request,
                    reservation(request, model) if scopes else 0, deployment=deployment.name)

    def _admit(self, job: JobRun, *, rewait: bool = False, until: float | None = None) -> Claim:
        """Wait in the provider's line until the job may start (its permits taken, and — unless
        ``rewait``, after an upstream 429 — the job claimed in the same step) or must not."""
        attempt, job.permit = self.admission.wait_for_turn(
            job_id=job.job_id, provider=job.provider.name, scopes=job.scopes, tokens=job.tokens, key=job.key,
            weight=1.0 if rewait else self.settings.registry.key_weights.get(job.key, 1.0),
            deadline=job.spec.deadline if until is None else until, execution=job.execution,
            job_lease_s=self.lease_ttl, rewait=rewait)
        if attempt.outcome is Start.TOO_LARGE and not rewait:
            error = ExceedsLimit(f"this request needs about {job.tokens} tokens, more than {attempt.detail}",
                                 code="request_exceeds_tpm", param="max_tokens")
            self.settler.settle(job.job_id, job.execution, job.spec, Settlement.failed(error))
            return Claim(JobState.FAILED)
        if attempt.outcome is Start.GONE:  # e.g. withdrawn: expired / cancelled
            return Claim(state_or_start(attempt.detail), lost_attempt=attempt.lost_attempt)
        return Claim(attempt.outcome, attempt.attempt, attempt.queue_wait_s)

    # ------------------------------------------------------------------------------------------
    def _execute(self, job: JobRun, attempt: int, queue_wait_s: float) -> str:
        if self.revoked(job.spec.api_key_id):  # accepted before its key was revoked: never call upstream
            revoked = AuthenticationFailed("the API key that submitted this job was revoked before it ran",
                                           code="key_revoked")
            return self.settler.settle(job.job_id, job.execution, job.spec, Settlement.failed(revoked))
        if job.spec.is_async:
            if attempt > 1:
                done = self._replay_if_settled(job)
                if done:
                    return done
            self.settler.mark_started(job.job_id, attempt, job.spec)
        # the previous attempt's worker died mid-run (its call may have cost money) — unless that
        # attempt ended by moving the job here (workers/failover.py)
        if attempt > 1 and attempt - 1 != self.failover.trail(job.spec).moved_at:
            self._record_lost_attempt(job, attempt - 1)
        queue_wait_ms = int(queue_wait_s * 1000)
        self.observe.started(job, queue_wait_s)
        try:
            invoke = self.observe.timed(job, self._invoker(job))
            answered = self._call_with_retries(job, attempt, invoke, queue_wait_ms)
        except GatewayError as exc:
            # a stream cut off mid-way: its budgets are charged what it produced (its try's usage row)
            partial = partial_bill(exc, job.model)
            charge = (to_units(partial["cost"]), partial["response"].usage.total_tokens) if partial else None
            return self.settler.settle(job.job_id, job.execution, job.spec,
                                       replace(Settlement.failed(exc), charge=charge))
        except Moved as moved:
            if job.spec.is_async:
                self.settler.mark_moved(job.job_id, attempt, moved.spec)
            return "moved"
        except WaitedOut:  # every deployment's breaker stayed open: the caller gets its 429, Retry-After
            expired = Expired("every deployment of this model was unavailable (circuit open) until max_wait")
            return self.settler.settle(job.job_id, job.execution, job.spec,
                                       Settlement(JobState.EXPIRED, expired))
        succeeded = self._succeeded(job, answered, attempt, queue_wait_ms)
        try:
            return self.settler.settle(job.job_id, job.execution, job.spec, succeeded)
        finally:  # the caller has its answer: now what only later calls read (workers/aftercall.py)
            self.aftercall.record(self._success(job, answered))

    @staticmethod
    def _success(job: JobRun, answered: Answered) -> Success:
        first = answered.response.first_token_ms   # a whole answer's first token is the whole call
        ttft: float | None = answered.latency_ms if first is None else first
        if not isinstance(job.request, ChatRequest):
            ttft = None   # an embeddings call feeds no TTFT average
        return Success(job.provider.name, job.deployment, job.model.alias, answered.latency_ms,
                       reported=answered.probe, ttft_ms=ttft)

    def _invoker(self, job: JobRun) -> Callable[[], ChatResponse]:
        adapter, request, model = self.adapters[job.provider.name], job.request, job.model
        if isinstance(request, EmbeddingsRequest):
            embed = getattr(adapter, "embed", None)
            if embed is None:
                raise InvalidRequest(f"provider '{job.provider.name}' does not serve embeddings",
                                     param="model")
            return lambda: embed(request, model)
        if request.stream:
            return lambda: self._relay(job, adapter, request, model)
        return lambda: adapter.complete(request, model)

    def _succeeded(self, job: JobRun, answered: Answered, attempt: int, queue_wait_ms: int) -> Settlement:
        model, provider = job.model, job.provider
        response, latency_ms, call_id = answered.response, answered.latency_ms, answered.call_id
        cost = model.price.cost(response.usage.prompt_tokens, response.usage.completion_tokens)
        trail = self.failover.trail(job.spec)
        meta = {"provider": provider.name, "provider_model": model.model, "queue_wait_ms": queue_wait_ms,
                "upstream_latency_ms": latency_ms, "cost_usd": money(cost), "attempt": attempt,
                "routing_decision": trail.decision, "deployment": job.deployment,
                "attempts": trail.calls + job.tries, "fallback_used": trail.fallback_used}
        streamed = isinstance(job.request, ChatRequest) and job.request.stream
        event: JobEvent = (Done(meta, response.body.get("usage")) if streamed
                           else Result(response.body, meta))
        billed = {**response.usage.model_dump(), "cost_usd": money(cost)}
        return Settlement(JobState.SUCCEEDED, event,
                          usage_row(job, call_id, queue_wait_ms, latency_ms, response=response, cost=cost),
                          result=response.body, billed=billed)

    def _relay(self, job: JobRun, adapter: Adapter, request: ChatRequest, model: Model) -> ChatResponse:
        """One try of a streamed call (workers/relay.py); ``job.first_token_ms`` is this try's."""
        job.first_token_ms = None
        trail = self.failover.trail(job.spec)
        served = {"provider": job.provider.name, "provider_model": model.model,
                  "deployment": job.deployment or f"{job.provider.name}/{model.model}",
                  "routing_decision": trail.decision, "fallback_used": trail.fallback_used}
        return relay_stream(self.store, self.observe, job.job_id, adapter, request, model,
                            on_first=lambda ms: setattr(job, "first_token_ms", ms), served=served)

    def _call_with_retries(self, job: JobRun, attempt: int, invoke: Callable[[], ChatResponse],
                           queue_wait_ms: int) -> Answered:
        """Call upstream until it answers or :func:`workers.policy.decide` says to fail. Every call
        that got an answer from upstream leaves a usage row; permits are settled after each call (TPM
        to the real token count; a 429 refunds its tokens and cools the provider down for everyone).
        A failure is reported to the breaker before the decision; a success only after the caller's
        answer (:meth:`_execute`), unless it was a half-open probe: that closes the breaker now."""
        give_up_at = time.time() + self.settings.task_time_limit
        tries = 0
        while True:
            probe = self.failover.gate(job.job_id, job.execution, job.spec, job.deployment, tries,
                                       attempt=attempt)
            tries += 1
            job.tries = tries
            call_id = f"{job.job_id}:{attempt}:{tries}"
            started = time.perf_counter()
            try:
                response = invoke()
            except ClientGone as exc:   # a stream cut off by its caller: the try's row bills what it produced
                self.settler.record_try(usage_row(job, call_id, queue_wait_ms,
                                                   int((time.perf_counter() - started) * 1000), error=exc,
                                                   **partial_bill(exc, job.model)))
                raise
            except UpstreamError as exc:
                latency_ms = int((time.perf_counter() - started) * 1000)
                self.failover.report(job.deployment, exc, probe=probe, latency_ms=latency_ms)
                rate_limited = isinstance(exc, UpstreamRateLimited)
                self._release(job, None, refund=rate_limited)
                if rate_limited and job.scopes:
                    self.admission.limiter.cool_down(job.provider.name, exc.retry_after or 1.0)
                partial = partial_bill(exc, job.model)   # a stream that broke off mid-way produced this
                if reached_upstream(exc) or partial:
                    self.settler.record_try(usage_row(job, call_id, queue_wait_ms, latency_ms, error=exc,
                                                       **partial))
                elsewhere = (self.failover.alternative(job.spec, job.deployment)
                             if may_move(exc, tries=tries, max_retries=job.provider.max_retries) else None)
                now = time.time()
                decision = decide(exc, tries=tries, max_retries=job.provider.max_retries,
                                  until_deadline_s=job.spec.deadline - now, until_give_up_s=give_up_at - now,
                                  elsewhere_s=(None if elsewhere is None
                                               else _start_in(elsewhere[1].start_in_s)),
                                  jitter=random.random())
                self._report_failure(job, exc, tries, decision)
                if decision.action is Action.MOVE and elsewhere is not None:
                    self.failover.move(job.job_id, job.execution, job.spec, job.deployment, tries, elsewhere,
                                       exc.code or type(exc).__name__, attempt=attempt)
                if decision.action in (Action.FAIL, Action.MOVE):
                    raise
                self._wait_to_retry(job, exc, decision, give_up_at)
                continue
            latency_ms = int((time.perf_counter() - started) * 1000)
            if probe:   # calls held back by the open breaker wait for this to close it: at once
                self.failover.report(job.deployment, None, probe=True, latency_ms=latency_ms)
            self.observe.attempt(job, tries, response=response)
            self._release(job, response.usage.total_tokens)
            if response.quota_reset_s and job.scopes:
                # the provider's headers say its quota is spent: hold everyone back before the 429s come
                self.admission.limiter.cool_down(job.provider.name, response.quota_reset_s)
            return Answered(response, latency_ms, call_id, probe)

    def _report_failure(self, job: JobRun, exc: UpstreamError, tries: int, decision: Decision) -> None:
        """Make a failed upstream attempt visible to the operator: one warning line (provider, model,
        status class, the message with the provider's key scrubbed, what happens next) and the
        provider's shared counts that ``/health`` shows."""
        message = scrub(exc.message, job.provider.api_key)
        label = self.upstream.record_failure(job.provider.name, exc, message)
        self.observe.attempt(job, tries, error=exc, then=decision, status=label)  # the warning line

    def _wait_to_retry(self, job: JobRun, exc: UpstreamError, decision: Decision, give_up_at: float) -> None:
        """Wait out ``decision`` before the next try. A limited job goes back to the head of its line
        for fresh permits: after a 429 at once (the shared cooldown holds it back) and until its
        deadline; after a failure once its backoff passed, and until the run's time limit."""
        if not job.scopes:
            time.sleep(decision.delay_s)
            return
        in_line = decision.action is Action.WAIT_IN_LINE
        if not in_line:
            time.sleep(decision.delay_s)
        if self._admit(job, rewait=True, until=None if in_line else give_up_at).outcome is not Start.RUN:
            raise exc

    def _renew_permit(self, job: JobRun) -> None:
        if job.permit is not None:
            self.admission.renew(job.permit)

    def _release(self, job: JobRun, actual_tokens: int | None, *, refund: bool = False) -> None:
        if job.permit is not None:
            self.admission.release(job.permit, actual_tokens, refund=refund)

    def fail_unexpectedly(self, job_id: str) -> None:
        """Best effort after an unexpected exception: settle the job as failed with a 500."""
        error = InternalError("the gateway failed while running this job; it has been logged")
        try:
            self.settler.settle(job_id, "", self.store.spec(job_id), Settlement.failed(error))
        except (redis.RedisError, SQLAlchemyError, OSError) as exc:
            log.error("job %s: could not settle after an unexpected error: %s", job_id, exc)

    def _outlived_lease(self, job_id: str) -> bool:
        """A delivery of a job whose lease is alive: wait up to one lease period (plus a little) for
        the lease to lapse. True if it did — its holder died, so this delivery is the job's only one
        (a message can come back before its job's lease lapsed, e.g. restored by a worker's cold
        shutdown; acking it as ``busy`` would leave the job ``running`` for ever) — False if the
        holder still renews it (this delivery is a duplicate: the holder will settle the job)."""
        give_up = time.monotonic() + self.lease_ttl + 2 * BUSY_POLL_S
        while time.monotonic() < give_up:
            time.sleep(BUSY_POLL_S)
            if not self.store.redis.exists(self.store.lease_key(job_id)):
                return True
        return False

    def _cancel_unrun(self, job: JobRun, lost_attempt: int) -> str:
        """The claim settled the job ``cancelled`` instead of running it (again) — nobody can use its
        answer (``job.lua`` job_check): record the attempt a dead worker lost, if any, and end the
        job's event stream (a caller still waiting — e.g. its API's heartbeat lapsed in a Redis
        outage — hears at once)."""
        if lost_attempt:
            self._record_lost_attempt(job, lost_attempt)
        event = unrun_event(JobState.CANCELLED, "the caller was already answered; the job was not run again")
        return self.settler.settle(job.job_id, job.execution, job.spec, Settlement(JobState.CANCELLED, event),
                            state_set=True)

    def _record_lost_attempt(self, job: JobRun, attempt: int) -> None:
        """A usage row for an attempt whose worker died: its upstream call may have been made (and
        billed by the provider) but its answer is lost. 0 tokens, cost 0, outcome ``attempt_lost``;
        written by whoever re-claims the job — at most once (its call_id is unique)."""
        row = replace(usage_row(job, f"{job.job_id}:{attempt}:lost", 0, 0), outcome=ATTEMPT_LOST,
                      status_code=None, error="the worker running this attempt died; whether the upstream "
                                              "call was made (and billed) is unknown")
        self.store.append_usage(row.as_row())
        log.warning("job %s: attempt %d was lost with its worker; recorded as %s", job.job_id, attempt,
                    ATTEMPT_LOST)

    def _replay_if_settled(self, job: JobRun) -> str | None:
        row = self.rows.get(job.job_id)
        if row is None or row.status not in (JobState.SUCCEEDED, JobState.FAILED):
            return None
        event = (Result(row.result or {}, {"provider": job.provider.name}) if row.status == JobState.SUCCEEDED
                 else Failed(row.error or {}))
        settlement = Settlement(JobState(row.status), event, charge=billed_charge(row.usage))
        return self.settler.settle(job.job_id, job.execution, job.spec, settlement, recorded=True)

    def _recover_missing(self, job_id: str) -> str:
        """Redis lost the job's live state (e.g. a Redis restart): an async job is rebuilt from its
        durable row so it still runs; a sync job's caller is gone with it."""
        row = self.rows.get(job_id)
        if row is None or row.status not in (JobState.QUEUED, JobState.RUNNING):
            return Start.MISSING
        remaining = (row.deadline_at - datetime.now(UTC)).total_seconds()
        if remaining <= 0:
            self.rows.settle(job_id, JobState.EXPIRED)
            return JobState.EXPIRED
        self.store.create(job_id, spec_of(row), max_wait=remaining, reply_to="", ttl=remaining + EVENT_TTL_S)
        return self.run(job_id)


def _start_in(estimate: float | None) -> float:
    """An alternative's start estimate for the policy: unknown (nothing completed lately) is 'later'."""
    return float("inf") if estimate is None else estimate


def job_lease_ttl(settings: Settings) -> float:
    """How long a dead worker keeps a job's (and a concurrency permit's) lease: short — the lease
    sweeper (workers/leases.py) puts a job whose lease lapsed back on its queue, so a SIGKILLed
    worker's jobs run again within ~this plus a sweep — but renewed three times per period while the
    call runs; below the visibility timeout, the last resort."""
    return max(2.0, min(LEASE_TTL_S, settings.visibility_timeout / 3))
