"""The worker's instrumentation: metrics, one log line per upstream attempt (``gateway.upstream``) and,
with tracing on, the job's ``chat {model}`` span and its children (``common/observability/tracing.py``).

Hooks, one line each in ``workers/runner.py`` and ``workers/settle.py``: :meth:`delivered` (a
delivery starts), :meth:`started` (claimed: its queue wait), :meth:`timed` (wraps the upstream call),
:meth:`attempt` (each upstream attempt's outcome), :meth:`first_token` (a stream's first chunk) and
:meth:`settled` (every settle). What one job's run has seen so far is kept in memory, per job, until it
settles (bounded: a job that never settles in this process is forgotten oldest first).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
from gevent import monkey

from common.contract import JobSpec, Result
from common.errors import GatewayError
from common.observability.labels import bounded, error_label, key_label
from common.observability.logs import UPSTREAM, configure_logging
from common.observability.metrics import ensure_metrics_dir, metrics
from common.observability.tracing import GENAI_PROVIDERS, Tracing
from common.settings import Settings
from common.types import ChatResponse
from common.upstream_health import scrub

log = logging.getLogger(UPSTREAM)
T = TypeVar("T")

MAX_TRACKED = 10_000   # jobs whose run this process remembers (more than any worker holds at once)


@dataclass
class _Seen:
    """One job's run in this process, as far as it got."""

    delivered: float                 # epoch s: the task started
    claimed: float | None = None     # epoch s: the job was claimed (queue wait ended)
    attempt_start: float = 0.0       # perf_counter of the current upstream attempt
    attempt_wall: float = 0.0        # epoch s of the same
    first_token: bool = False
    span: Any = None                 # the job's chat span (tracing on)


class WorkerObserver:
    """What one worker process records; :func:`observer` gives the process's one instance."""

    def __init__(self, settings: Settings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.obs = settings.observability
        self.models = frozenset(settings.registry.models)
        self.providers = frozenset(settings.registry.providers)
        self.metrics = metrics()
        self.tracing = tracing or Tracing(self.obs)
        self.jobs: OrderedDict[str, _Seen] = OrderedDict()

    def _labels(self, model: str, provider: str) -> tuple[str, str]:
        return bounded(provider, self.providers), bounded(model, self.models)

    def _seen(self, job_id: str) -> _Seen:
        seen = self.jobs.get(job_id)
        if seen is None:
            seen = self.jobs[job_id] = _Seen(time.time())
            while len(self.jobs) > MAX_TRACKED:
                self.jobs.popitem(last=False)
        return seen

    # hooks ------------------------------------------------------------------------------------
    def delivered(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._seen(job_id)

    def started(self, job: Any, queue_wait_s: float) -> None:
        """``job`` (a runner's ``_Run``) was claimed after waiting ``queue_wait_s`` since its creation."""
        if self.obs.metrics:
            provider, model = self._labels(job.spec.model, job.provider.name)
            m = self.metrics
            m.of(m.queue_wait_seconds, provider, model).observe(max(0.0, queue_wait_s))
        seen = self._seen(job.job_id)
        seen.claimed = now = time.time()
        if not self.tracing.enabled:
            return
        created = min(now - max(0.0, queue_wait_s), seen.delivered)
        seen.span = self.tracing.start(
            f"chat {job.model.model}", kind="CLIENT", start=created, traceparent=job.spec.trace,
            attributes={"gen_ai.operation.name": "chat" if job.spec.kind == "chat" else "embeddings",
                        "gen_ai.provider.name": GENAI_PROVIDERS.get(job.provider.kind, job.provider.kind),
                        "gen_ai.request.model": job.model.model, "gateway.model": job.spec.model,
                        "gateway.provider": job.provider.name, "gateway.job_id": job.job_id})
        self.tracing.span("queue", start=created, end=seen.delivered, parent=seen.span)
        self.tracing.span("admission", start=seen.delivered, end=now, parent=seen.span)

    def timed(self, job: Any, invoke: Callable[[], T]) -> Callable[[], T]:
        """``invoke`` (one upstream call), noting when each attempt starts."""
        seen = self._seen(job.job_id)

        def call() -> T:
            seen.attempt_start, seen.attempt_wall = time.perf_counter(), time.time()
            return invoke()
        return call

    def first_token(self, job_id: str, model: Any) -> None:
        """A stream's first chunk went out: time to first token since the attempt started."""
        seen = self._seen(job_id)
        if seen.first_token or not seen.attempt_start or not self.obs.metrics:
            return
        seen.first_token = True
        provider, alias = self._labels(model.alias, model.provider)
        m = self.metrics
        m.of(m.ttft_seconds, provider, alias).observe(time.perf_counter() - seen.attempt_start)

    def attempt(self, job: Any, tries: int, *, response: ChatResponse | None = None,
                error: GatewayError | None = None, then: Any = None, status: str | None = None) -> None:
        """One upstream attempt ended with ``response`` or ``error`` (``then``: the policy's decision
        after a failure; ``status``: the failure's status class for the log line, default its error
        code). Counted, timed, logged (a failure at WARNING), and traced."""
        seen = self._seen(job.job_id)
        elapsed = time.perf_counter() - seen.attempt_start if seen.attempt_start else 0.0
        outcome = "success" if error is None else error_label(error)
        retrying = error is not None and then is not None and then.action.value != "fail"
        if self.obs.metrics:
            provider, model = self._labels(job.spec.model, job.provider.name)
            m = self.metrics
            m.of(m.upstream_attempts, provider, model, outcome).inc()
            m.of(m.upstream_seconds, provider, model, outcome).observe(elapsed)
            if retrying:
                m.of(m.retries, provider, model, outcome).inc()
        if seen.span is not None:
            self.tracing.span(f"upstream {job.provider.name}", kind="CLIENT", start=seen.attempt_wall,
                              end=seen.attempt_wall + elapsed, parent=seen.span,
                              attributes={"gateway.try": tries}, error=None if error is None else outcome)
        if error is not None or log.isEnabledFor(logging.INFO):
            self._log_attempt(job, tries, elapsed, outcome, response, error, then if retrying else None,
                              status or outcome)

    def _log_attempt(self, job: Any, tries: int, elapsed: float, outcome: str, response: ChatResponse | None,
                     error: GatewayError | None, then: Any, status: str) -> None:
        """The attempt's ``gateway.upstream`` line; a failure's at WARNING, worded as firsthour's line."""
        fields: dict[str, Any] = {
            "job_id": job.job_id, "key_id": job.spec.api_key_id, "model": job.spec.model,
            "provider": job.provider.name, "provider_model": job.model.model, "try": tries,
            "outcome": outcome, "latency_ms": round(elapsed * 1000, 1)}
        if response is not None:
            usage = response.usage
            fields.update(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
        if self.obs.log_content:
            fields["prompt"] = job.spec.request.get("messages", job.spec.request.get("input"))
            if response is not None:
                fields["answer"] = response.body.get("choices")
        if error is None:
            log.info("upstream attempt ok: provider=%s model=%s job=%s try=%d", job.provider.name,
                     job.spec.model, job.job_id, tries, extra={"fields": fields})
        else:
            then_text = ("giving up" if then is None
                         else "moving to another deployment" if then.action.value == "move"
                         else f"{then.action.value.replace('_', ' ')} in {then.delay_s:.2f}s")
            message = scrub(error.message, job.provider.api_key)
            fields.update(status=error.status, status_class=status, error=message, then=then_text)
            log.warning("upstream attempt failed: provider=%s model=%s (%s) status=%s job=%s try=%d: %s; %s",
                        job.provider.name, job.spec.model, job.model.model, status, job.job_id, tries,
                        message, then_text, extra={"fields": fields})

    def settled(self, job_id: str, spec: JobSpec | None, settlement: Any) -> None:
        """Every settle (``Settler.settle``): the job's final state, its tokens and cost; its span ends."""
        seen = self.jobs.pop(job_id, None)
        if spec is None:
            return
        if self.obs.metrics:
            self._count_settled(spec, settlement)
        if seen is None or seen.span is None:
            return
        self._end_span(seen, settlement)

    def _count_settled(self, spec: JobSpec, settlement: Any) -> None:
        provider, model = self._labels(spec.model, spec.provider)
        m = self.metrics
        m.of(m.jobs_finished, provider, model, str(settlement.state)).inc()
        usage = settlement.usage
        key = key_label(spec.api_key_id, self.obs.metrics_key_labels)
        if usage is not None:
            m.of(m.tokens, provider, model, "input").inc(usage.prompt_tokens)
            m.of(m.tokens, provider, model, "output").inc(usage.completion_tokens)
            m.of(m.cost_usd, provider, model).inc(float(usage.cost_usd))
            if key is not None:
                m.of(m.key_tokens, key, "input").inc(usage.prompt_tokens)
                m.of(m.key_tokens, key, "output").inc(usage.completion_tokens)
                m.of(m.key_cost_usd, key).inc(float(usage.cost_usd))

    def _end_span(self, seen: _Seen, settlement: Any) -> None:
        usage = settlement.usage
        attributes: dict[str, Any] = {"gateway.state": str(settlement.state)}
        if usage is not None:
            attributes.update({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                               "gen_ai.usage.output_tokens": usage.completion_tokens,
                               "gen_ai.response.model": usage.provider_model})
        event = settlement.event
        if isinstance(event, Result):
            reasons = [c.get("finish_reason") for c in event.result.get("choices", []) if isinstance(c, dict)]
            attributes["gen_ai.response.finish_reasons"] = [r for r in reasons if isinstance(r, str)]
            if isinstance(event.result.get("id"), str):
                attributes["gen_ai.response.id"] = event.result["id"]
        state = str(settlement.state)
        failed = settlement.error.get("code") if isinstance(settlement.error, dict) else None
        self.tracing.end(seen.span, attributes=attributes,
                         error=None if state == "succeeded" else (failed or state))


_observers: dict[int, WorkerObserver] = {}


def observer(settings: Settings) -> WorkerObserver:
    """The worker process's observer for ``settings`` (one: the runner and its settler share it).
    The first call also configures the process's logging (level, format; under the gevent pool lines
    are written in batches from the event loop, as the API's: one ``gateway.upstream`` line per attempt,
    each its own write to ``up``'s pipe, was 2–4 % of the worker's CPU)."""
    found = _observers.get(id(settings))
    if found is None:
        configure_logging(settings.observability,
                          schedule=gevent.spawn_later if monkey.is_module_patched("threading") else None)
        ensure_metrics_dir(settings.observability.metrics_dir)
        found = _observers[id(settings)] = WorkerObserver(settings)
    return found
