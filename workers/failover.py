"""The worker's side of routing: the breaker gate before each upstream call, the outcome reported
after it, and moving a job to the next deployment (``common/routing``) when this one cannot serve it.

A job moves by being re-queued on the other deployment's provider queue (``JobStore.move``,
``job.lua`` job_requeue): it keeps its id, its waiting caller (``reply_to``) and its deadline; its
spec names the new alias/deployment and its :class:`~common.routing.Trail` (what was tried). The
run that moved it ends without settling it (:class:`Moved`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from common.contract import JobSpec
from common.errors import GatewayError
from common.jobs import JobStore
from common.lua import ScriptBatch
from common.registry import Deployment, Model
from common.routing import Candidate, Load, Trail, candidates, fitting, serving
from common.routing.breaker import CLOSED_FRESH_S, ClosedMemo, Gate, Verdict, state_of, verdict
from common.routing.observe import Router
from common.settings import Settings
from common.taskwire import task_message
from common.tokens import estimate_prompt_tokens
from common.types import ChatRequest

log = logging.getLogger(__name__)

GATE_POLL_S = 1.0   # how often a job waiting for a half-open probe looks again (and for a way out)


class Moved(Exception):
    """The job went to another deployment's queue (its new ``spec``); this run ends without settling it."""

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec.deployment)
        self.spec = spec


class WaitedOut(Exception):
    """Every deployment the job could use stayed open (circuit breakers) until its deadline."""


class Failover:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.router = Router(settings, store)
        self.closed = ClosedMemo(CLOSED_FRESH_S)   # skips admit while a success just heard 'closed'
        self._homes: dict[tuple[str, str, str], tuple[Model, Deployment]] = {}   # bounded by the registry

    def home(self, spec: JobSpec) -> tuple[Model, Deployment]:
        """The job's alias as served by the deployment its spec names (:func:`common.routing.serving`).
        Remembered per (alias, deployment, provider): the registry is read once per process and its
        models are frozen, and building the served model (a pydantic copy) was ~35 µs of every job."""
        named = (spec.model, spec.deployment, spec.provider)
        found = self._homes.get(named)
        if found is None:
            model = self.settings.registry.models[spec.model]
            deployment = serving(model, spec.deployment, spec.provider)
            found = self._homes[named] = (model.on(deployment), deployment)
        return found

    @staticmethod
    def trail(spec: JobSpec) -> Trail:
        return spec.trail or Trail(spec.model, "only")

    def alternative(self, spec: JobSpec, current: str) -> tuple[Candidate, Load, str] | None:
        """The best usable deployment for the job other than ``current`` and those it tried (the
        requested alias's, then its fallbacks'), by the alias's strategy; None if there is none."""
        trail = self.trail(spec)
        exclude = {*trail.tried, current}
        request = spec.canonical_request()
        fits = None
        if isinstance(request, ChatRequest):
            wanted = request.max_completion_tokens or request.max_tokens or 0
            fits = fitting(lambda m: estimate_prompt_tokens(request, m), wanted)
        chain = [c for c in candidates(self.settings.registry, trail.requested, fits)
                 if c.name not in exclude]
        if not chain:
            return None
        requested = self.settings.registry.models[trail.requested]
        picked = self.router.pick(self.settings.registry.strategy_of(requested), chain)
        return None if picked is None or picked[2] == "wait-for-probe" else picked

    def move(self, job_id: str, execution: str, spec: JobSpec, current: str, calls_here: int,
             to: tuple[Candidate, Load, str], why: str, *, attempt: int) -> None:
        """Re-queue the job on ``to``'s provider queue; raises :class:`Moved` (or returns, if the job
        is no longer this execution's to move: it was abandoned or settled meanwhile)."""
        candidate, _, decision = to
        trail = self.trail(spec)
        moved = replace(spec, model=candidate.alias, provider=candidate.provider, deployment=candidate.name,
                        trail=Trail(trail.requested, f"{decision} after {why}", [*trail.tried, current],
                                    trail.fallback_used or candidate.fallback, trail.calls + calls_here,
                                    moved_at=attempt))
        queue = self.settings.queue_for(candidate.provider)
        if self.store.move(job_id, execution, moved, queue=self.settings.queue_key(candidate.provider),
                           message=task_message(job_id, queue)):
            log.warning("job %s: moved from %s to %s (%s)", job_id, current, candidate.name, why)
            raise Moved(moved)

    def gate(self, job_id: str, execution: str, spec: JobSpec, deployment: str, calls_here: int, *,
             attempt: int) -> bool:
        """Wait until the deployment's breaker lets a call through; True if the call is a half-open
        probe. While it is open the job moves to a usable deployment if there is one (:class:`Moved`),
        else waits for the first probe slot until its deadline (:class:`WaitedOut`)."""
        if not self.settings.breakers or self.closed.closed(deployment):
            return False
        while True:
            admission = self.router.breakers.admit(deployment)
            if admission.gate is not Gate.OPEN:
                return admission.gate is Gate.PROBE
            other = self.alternative(spec, deployment)
            if other is not None:
                self.move(job_id, execution, spec, deployment, calls_here, other, "circuit open",
                          attempt=attempt)
            left = spec.deadline - time.time()
            if left <= 0:
                raise WaitedOut(deployment)
            time.sleep(max(0.05, min(admission.wait_s, left, GATE_POLL_S)))

    def report(self, deployment: str, error: GatewayError | None, *, probe: bool,
               latency_ms: float) -> Verdict:
        """Report one call's outcome to the deployment's breaker now (a failure, before deciding to
        retry or move; a probe's success, which closes it)."""
        outcome = verdict(error)
        if not self.settings.breakers:
            return outcome
        asked = self.closed.clock()
        state = self.router.breakers.report(deployment, outcome, probe=probe, latency_ms=latency_ms)
        self.closed.heard(deployment, outcome, state, asked=asked)
        return outcome

    def report_in(self, batch: ScriptBatch, deployment: str, *,
                  latency_ms: float) -> Callable[[list[Any]], None]:
        """Queue a (non-probe) success's report on ``batch``; returns what takes the batch's replies
        (it remembers the state the breaker answered: :class:`~common.routing.breaker.ClosedMemo`)."""
        if not self.settings.breakers:
            return lambda replies: None
        asked = self.closed.clock()
        index = self.router.breakers.report_in(batch, deployment, Verdict.OK, probe=False,
                                               latency_ms=latency_ms)
        return lambda replies: self.closed.heard(deployment, Verdict.OK, state_of(replies[index]),
                                                 asked=asked)
