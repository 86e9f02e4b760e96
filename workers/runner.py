"""Running one job: claim it, call its provider, record what it cost, settle it, tell the waiter.

:class:`JobRunner` holds a worker process's collaborators (built once by :func:`build_runner`) and
is what the Celery task calls. Every exit path settles the job exactly once and releases its lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy.exc import SQLAlchemyError

from common.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.jobs import Claim, JobStore
from common.limits import Limiter, Scope
from common.registry import Model, Provider
from common.settings import Settings
from common.tokens import reservation
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest, Usage
from workers.adapters.base import Adapter, build_adapter, make_http_session
from workers.admission import AdmissionControl, Permit, scopes_for
from workers.reconciler import JobReconciler, async_spec
from workers.usage import UsageFlusher, UsageLedger, UsageRecord

log = logging.getLogger(__name__)

EVENT_TTL = 3600.0  # seconds a job's event stream stays readable after its last event
REDIS_CONNECTIONS = 64  # per worker process (two are held: the wake subscription and the usage reader)
ABORT_CHECK_S = 0.25  # how often a relayed stream checks whether its client went away


class JobRunner:
    def __init__(self, settings: Settings, store: JobStore, ledger: UsageLedger,
                 adapters: dict[str, Adapter], admission: AdmissionControl) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.adapters = adapters
        self.admission = admission
        self.lease_ttl = job_lease_ttl(settings)
        registry = settings.registry
        self.limits_configured = (any(p.limits.any for p in registry.providers.values())
                                  or any(m.limits.any for m in registry.models.values()) or bool(registry.key_limits))

    def run(self, job_id: str) -> str:
        """Run a delivered job; returns what happened (for logs and tests)."""
        execution = f"{os.getpid()}:{secrets.token_hex(4)}"
        call: _Call | None = None
        if self.limits_configured:  # learn which limits this job counts against before it may start
            peek = self.store.spec(job_id)
            if peek is None:
                return self._recover_missing(job_id)
            call = self._call(job_id, execution, peek)
        if call is not None and call.scopes:  # wait in the provider's line; admission claims atomically
            attempt, call.permit = self.admission.wait_for_turn(
                job_id=job_id, provider=call.provider.name, scopes=call.scopes, tokens=call.tokens, key=call.key,
                weight=self.settings.registry.key_weights.get(call.key, 1.0), deadline=call.spec["deadline"],
                execution=execution, job_lease_s=self.lease_ttl)
            if attempt.outcome == "too_large":
                error = InvalidRequest(f"this request needs about {call.tokens} tokens, more than {attempt.detail}",
                                       code="request_exceeds_tpm", param="max_tokens")
                self._settle(job_id, execution, call.provider.name, call.spec["mode"] == "async", state="failed",
                             event={"type": "error", "error": error.to_dict()}, job_update={"error": error.to_dict()})
                return "failed"
            claim = attempt.claim or Claim("busy" if attempt.detail == "busy" else attempt.outcome)
        else:  # no limits apply: claim straight away (the claim returns the spec: one round trip)
            claim = self.store.claim(job_id, execution, self.lease_ttl)
        if claim.outcome == "missing":
            return self._recover_missing(job_id)
        if claim.outcome == "expired":
            self._settle_unrun(job_id, "expired", "the job waited longer than its max_wait and was withdrawn")
            return "expired"
        if claim.outcome != "run" or claim.spec is None:
            return claim.outcome  # busy (another worker runs it) or already settled: nothing to do
        if call is None:
            call = self._call(job_id, execution, claim.spec)
        heartbeat = _LeaseHeartbeat(self.store, job_id, execution, self.lease_ttl,
                                    renew_permit=lambda: call.permit and self.admission.renew(call.permit))
        heartbeat.start()
        try:
            return self._execute(call, claim.spec, claim.attempt, claim.queue_wait_s)
        finally:
            heartbeat.stop()
            if call.permit is not None:
                self.admission.release(call.permit, None)

    def _call(self, job_id: str, execution: str, spec: dict[str, Any]) -> _Call:
        model = self.settings.registry.models[spec["model"]]
        provider = self.settings.registry.provider_of(model)
        key = spec.get("api_key_id") or "-"
        return _Call(job_id, execution, spec, model, provider, key,
                     scopes_for(self.settings.registry, model, provider, key))

    # ------------------------------------------------------------------------------------------
    def _execute(self, call: _Call, spec: dict[str, Any], attempt: int, queue_wait_s: float) -> str:
        job_id, execution, model, provider = call.job_id, call.execution, call.model, call.provider
        is_async = spec["mode"] == "async"
        queue_wait_ms = int(queue_wait_s * 1000)
        if is_async:
            if attempt > 1:
                done = self._replay_if_settled(job_id, execution, provider.name)
                if done:
                    return done
            self.ledger.mark_job(job_id, status="running", started_at=_now(), attempts=attempt)
        request = call.request
        deadline = float(spec["deadline"])
        adapter = self.adapters[provider.name]
        if isinstance(request, EmbeddingsRequest):
            embed = getattr(adapter, "embed", None)
            if embed is None:
                error = InvalidRequest(f"provider '{provider.name}' does not serve embeddings", param="model")
                self._settle(job_id, execution, provider.name, is_async, state="failed",
                             event={"type": "error", "error": error.to_dict()}, job_update={"error": error.to_dict()})
                return "failed"
            invoke: Callable[[], ChatResponse] = lambda: embed(request, model)
        elif request.stream:
            invoke = lambda: self._relay_stream(job_id, adapter, request, model)
        else:
            invoke = lambda: adapter.complete(request, model)
        try:
            response, latency_ms, call_id = self._call_with_retries(call, attempt, invoke, queue_wait_ms, deadline)
        except GatewayError as exc:
            state = "cancelled" if exc.code == "client_closed" else "failed"
            self._settle(job_id, execution, provider.name, is_async, state=state,
                         event={"type": "error", "error": exc.to_dict()},
                         job_update={"error": exc.to_dict()})
            return state
        cost = model.price.cost(response.usage.prompt_tokens, response.usage.completion_tokens)
        meta = {"provider": provider.name, "provider_model": model.model, "queue_wait_ms": queue_wait_ms,
                "upstream_latency_ms": latency_ms, "cost_usd": _money(cost), "attempt": attempt}
        usage_row = UsageRecord(call_id=call_id, job_id=job_id, api_key_id=spec.get("api_key_id"),
                                model=model.alias, provider=provider.name, provider_model=model.model,
                                prompt_tokens=response.usage.prompt_tokens,
                                completion_tokens=response.usage.completion_tokens, cost_usd=cost,
                                queue_wait_ms=queue_wait_ms, upstream_latency_ms=latency_ms,
                                outcome="success", status_code=200)
        streamed = isinstance(request, ChatRequest) and request.stream
        event = ({"type": "done", "meta": meta, "usage": response.body.get("usage")} if streamed
                 else {"type": "result", "result": response.body, "meta": meta})
        self._settle(job_id, execution, provider.name, is_async, state="succeeded", event=event, usage=usage_row,
                     job_update={"result": response.body,
                                 "usage": {**response.usage.model_dump(), "cost_usd": _money(cost)}})
        return "succeeded"

    def _relay_stream(self, job_id: str, adapter: Adapter, request: ChatRequest, model: Model) -> ChatResponse:
        """Forward each upstream chunk to the waiting API as it arrives (no buffering); returns the
        usage. Once a chunk went out the call cannot be retried: a later failure ends the stream with
        an error. Checks every ``ABORT_CHECK_S`` whether the client went away, and if so closes the
        upstream call."""
        chunks = adapter.stream(request, model)
        sent = 0
        usage: dict[str, Any] = {}
        checked = time.monotonic()
        try:
            for chunk in chunks:
                if chunk.get("usage"):
                    usage = chunk["usage"]
                self.store.emit(job_id, {"type": "chunk", "chunk": chunk}, ttl=EVENT_TTL)
                sent += 1
                if time.monotonic() - checked > ABORT_CHECK_S:
                    checked = time.monotonic()
                    if self.store.aborted(job_id):
                        raise GatewayError("the client disconnected; the upstream call was aborted",
                                           status=499, code="client_closed")
        except UpstreamError as exc:
            if not sent:
                raise
            raise GatewayError(f"the upstream stream broke off: {exc.message}", status=502,
                               code="upstream_stream_broken") from None
        finally:
            chunks.close()  # type: ignore[attr-defined]
        return ChatResponse(body={"usage": usage} if usage else {},
                            usage=Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                        completion_tokens=int(usage.get("completion_tokens") or 0)))

    def _call_with_retries(self, call: _Call, attempt: int, invoke: Callable[[], ChatResponse], queue_wait_ms: int,
                           deadline: float) -> tuple[ChatResponse, int, str]:
        """Call upstream. 5xx/timeouts are retried with backoff (``max_retries``); an upstream 429 puts
        the provider into a cooldown shared by all workers and the job back at the head of its line,
        retried until its deadline — a 429 is not a failure while the caller's max_wait remains.
        Every call that got an answer from upstream leaves a usage row; permits are settled after
        each call (TPM to the real token count; a 429 refunds its tokens)."""
        job_id, model, provider = call.job_id, call.model, call.provider
        give_up_at = time.time() + self.settings.task_time_limit
        tries = 0
        while True:
            tries += 1
            call_id = f"{job_id}:{attempt}:{tries}"
            started = time.perf_counter()
            try:
                response = invoke()
            except UpstreamError as exc:
                latency_ms = int((time.perf_counter() - started) * 1000)
                rate_limited = isinstance(exc, UpstreamRateLimited)
                if call.permit is not None:
                    self.admission.release(call.permit, None, refund=rate_limited)
                if rate_limited and call.scopes:
                    self.admission.limiter.cool_down(provider.name, exc.retry_after or 1.0)
                if not isinstance(exc, UpstreamTimeout | UpstreamUnavailable) or exc.code == "upstream_auth_failed":
                    self.ledger.record(UsageRecord(
                        call_id=call_id, job_id=job_id, api_key_id=call.spec.get("api_key_id"), model=model.alias,
                        provider=provider.name, provider_model=model.model, prompt_tokens=0,
                        completion_tokens=0, cost_usd=Decimal(0), queue_wait_ms=queue_wait_ms,
                        upstream_latency_ms=latency_ms, outcome=exc.code or "error", status_code=exc.status,
                        error=exc.message[:500]))
                wait = self._retry_delay(exc, tries, provider, deadline if rate_limited else give_up_at)
                if wait is None:
                    raise
                log.info("job %s: %s; retrying in %.2fs", job_id, exc.code, wait)
                if call.scopes:
                    self._rewait(call, exc, wait if not rate_limited else 0.0, deadline if rate_limited else give_up_at)
                else:
                    time.sleep(wait)
                continue
            latency_ms = int((time.perf_counter() - started) * 1000)
            if call.permit is not None:
                self.admission.release(call.permit, response.usage.total_tokens)
            if response.quota_reset_s and call.scopes:
                # the provider's headers say its quota is spent: hold everyone back before the 429s come
                self.admission.limiter.cool_down(provider.name, response.quota_reset_s)
            return response, latency_ms, call_id

    def _rewait(self, call: _Call, exc: UpstreamError, backoff: float, limit: float) -> None:
        """Back to the head of the line for fresh permits (after the shared cooldown, if any)."""
        if backoff:
            time.sleep(backoff)
        attempt, call.permit = self.admission.wait_for_turn(
            job_id=call.job_id, provider=call.provider.name, scopes=call.scopes, tokens=call.tokens, key=call.key,
            weight=1.0, deadline=limit, execution=call.execution, job_lease_s=self.lease_ttl, rewait=True)
        if attempt.outcome != "run":
            raise exc

    @staticmethod
    def _retry_delay(exc: UpstreamError, tries: int, provider: Provider, limit: float) -> float | None:
        if isinstance(exc, UpstreamRateLimited):
            wait = exc.retry_after if exc.retry_after is not None else min(2.0 ** tries, 30.0)
        elif isinstance(exc, UpstreamTimeout | UpstreamUnavailable) and exc.code != "upstream_auth_failed":
            if tries > provider.max_retries:
                return None
            wait = min(0.25 * 2 ** (tries - 1), 5.0)
        else:
            return None
        return wait if time.time() + wait < limit else None

    def _settle(self, job_id: str, execution: str, provider: str, is_async: bool, *, state: str,
                event: dict[str, Any], usage: UsageRecord | None = None,
                job_update: dict[str, Any] | None = None) -> None:
        """Settle the job and account for its call, atomically.

        Async job: its row and usage row in one Postgres transaction, then the Redis state (a crash in
        between is repaired on redelivery by :meth:`_replay_if_settled`, not by calling upstream again).
        Sync job: the usage row rides in the same Redis script that settles the job, onto the usage
        stream that the ledger drains into Postgres in batches — one round trip on the hot path."""
        if is_async:
            update = {"status": state, "finished_at": _now(), **(job_update or {})}
            self.ledger.record(usage, job_update=update, job_id=job_id)
            usage = None
        self.store.emit(job_id, event, ttl=EVENT_TTL, final_state=state, worker_id=execution, provider=provider,
                        usage=usage.as_row() if usage is not None else None)

    def fail_unexpectedly(self, job_id: str) -> None:
        """Best effort after an unexpected exception: settle the job as failed with a 500."""
        error = GatewayError("the gateway failed while running this job; it has been logged", status=500,
                             code="internal_error")
        try:
            spec = self.store.spec(job_id) or {}
            self._settle(job_id, "", str(spec.get("provider", "")), spec.get("mode") == "async", state="failed",
                         event={"type": "error", "error": error.to_dict()}, job_update={"error": error.to_dict()})
        except (redis.RedisError, SQLAlchemyError, OSError) as exc:
            log.error("job %s: could not settle after an unexpected error: %s", job_id, exc)

    def _settle_unrun(self, job_id: str, state: str, message: str) -> None:
        spec = self.store.spec(job_id) or {}
        if spec.get("mode") == "async":
            self.ledger.mark_job(job_id, status=state, finished_at=_now())
        self.store.emit(job_id, {"type": state, "message": message}, ttl=EVENT_TTL)

    def _replay_if_settled(self, job_id: str, execution: str, provider: str) -> str | None:
        job = self.ledger.load_job(job_id)
        if job is None or job.status not in ("succeeded", "failed"):
            return None
        event = ({"type": "result", "result": job.result, "meta": {"provider": provider}}
                 if job.status == "succeeded" else {"type": "error", "error": job.error})
        self.store.emit(job_id, event, ttl=EVENT_TTL, final_state=job.status, worker_id=execution, provider=provider)
        return job.status

    def _recover_missing(self, job_id: str) -> str:
        """Redis lost the job's live state (e.g. a Redis restart): an async job is rebuilt from its
        durable row so it still runs; a sync job's caller is gone with it."""
        job = self.ledger.load_job(job_id)
        if job is None or job.status not in ("queued", "running"):
            return "missing"
        remaining = (job.deadline_at - datetime.now(UTC)).total_seconds()
        if remaining <= 0:
            self.ledger.mark_job(job_id, status="expired", finished_at=_now())
            return "expired"
        self.store.create(job_id, async_spec(job), max_wait=remaining, reply_to="", ttl=remaining + EVENT_TTL,
                          mode="async")
        return self.run(job_id)


class _Call:
    """One job's run: what it calls, the limits it counts against, the permit it holds now."""

    def __init__(self, job_id: str, execution: str, spec: dict[str, Any], model: Model, provider: Provider,
                 key: str, scopes: list[Scope]) -> None:
        self.job_id = job_id
        self.execution = execution
        self.spec = spec
        self.model = model
        self.provider = provider
        self.scopes = scopes
        self.key = key
        self.request: ChatRequest | EmbeddingsRequest = (
            EmbeddingsRequest.model_validate(spec["request"]) if spec.get("kind") == "embeddings"
            else ChatRequest.model_validate(spec["request"]))
        self.tokens = reservation(self.request, model) if scopes else 0
        self.permit: Permit | None = None


class _LeaseHeartbeat:
    """Renews a running job's lease (and its concurrency permit) every third of its TTL; if the worker
    dies both lapse."""

    def __init__(self, store: JobStore, job_id: str, execution: str, ttl: float,
                 renew_permit: Callable[[], object]) -> None:
        self._stop = threading.Event()
        self._renew_permit = renew_permit
        self._thread = threading.Thread(target=self._loop, args=(store, job_id, execution, ttl), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self, store: JobStore, job_id: str, execution: str, ttl: float) -> None:
        while not self._stop.wait(ttl / 3):
            try:
                if not store.renew_lease(job_id, execution, ttl):
                    return
                self._renew_permit()
            except redis.RedisError as exc:
                log.warning("job %s: lease renewal failed: %s", job_id, exc)


def build_runner(settings: Settings) -> JobRunner:
    from common.db import make_session_factory

    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("workers need REDIS_URL and DATABASE_URL")
    # bounded: a worker may hold thousands of jobs (waiting in line, or relaying streams) and each
    # needs a connection only for one short command at a time; an unbounded pool grew one per job
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=REDIS_CONNECTIONS, timeout=30,
                                                 health_check_interval=30)
    client = redis.Redis(connection_pool=pool)
    adapters = {name: build_adapter(p, make_http_session(p.pool))
                for name, p in settings.registry.providers.items() if p.routable}
    store = JobStore(client, settings.key_prefix)
    ledger = UsageLedger(make_session_factory(settings.database_url))
    UsageFlusher(store, ledger, consumer=f"{socket.gethostname()}:{os.getpid()}").start()
    JobReconciler(settings, store, ledger).start()
    lease_ttl = job_lease_ttl(settings)
    return JobRunner(settings, store, ledger, adapters, AdmissionControl(
        Limiter(store, keyed=bool(settings.registry.key_limits)), call_lease_s=lease_ttl))


def job_lease_ttl(settings: Settings) -> float:
    """How long a dead worker keeps a job's (and a concurrency permit's) lease: short, but renewed
    three times per period while the call runs; below the visibility timeout so redelivery can take over."""
    return max(2.0, min(30.0, settings.visibility_timeout / 3))


def _now() -> datetime:
    return datetime.now(UTC)


def _money(value: Decimal) -> str:
    return format(value.quantize(Decimal("0.0000000001")).normalize(), "f")
