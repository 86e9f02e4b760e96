"""The API's instrumentation: one metrics update, one access log line (``gateway.access``) and, with
tracing on, one server span per HTTP request — all recorded when the response is closed (after a
stream's last byte), so the latency is end to end.

Hooks, one line each where they are called: :func:`begin` (``before_request``), :func:`note_job`
(the gateway queued a job: its id, model and trace context), :func:`note_outcome` (the job's result
arrived: its queue wait and upstream time, for the gateway's own overhead), :func:`finish`
(``after_request``). The log line never holds a prompt, an answer or a secret: only ids, names,
statuses, timings and what the response headers say.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import gevent
from flask import Flask, Response, current_app, g, has_request_context, request
from gevent import monkey

from common.contract import JobSpec
from common.observability.labels import NONE, OTHER, bounded, error_codes, key_label, status_class
from common.observability.logs import ACCESS, configure_logging
from common.observability.metrics import ensure_metrics_dir, metrics
from common.observability.tracing import Tracing
from common.settings import Settings

access = logging.getLogger(ACCESS)
EXTENSION = "gateway.observe"


class ApiObserver:
    """What the API process records per request; built once by ``create_app`` (:func:`install`)."""

    def __init__(self, settings: Settings, app: Flask, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.obs = settings.observability
        self.models = frozenset(settings.registry.models)
        self.protocols = app.blueprints  # bounded by the code: one label value per blueprint
        self.metrics = metrics()
        self.tracing = tracing or Tracing(self.obs)
        # nothing to record (metrics off, access lines below the level, no traces): no per-request work
        self.active = self.obs.metrics or access.isEnabledFor(logging.INFO) or self.tracing.enabled

    def record(self, response: Response, seen: dict[str, Any]) -> None:
        """The request is done (its body sent): count it, time it, log it, end its span. ``seen``:
        what the request context held (:func:`_seen`; the context is gone once the body is sent)."""
        elapsed = time.perf_counter() - seen["t0"]
        status = response.status_code
        protocol = bounded(seen["blueprint"], self.protocols)
        if protocol == NONE:
            protocol = OTHER
        model = bounded(seen["model"], self.models)
        klass = status_class(status)
        code = _error_code(response) if status >= 400 else None
        outcome = seen["outcome"]
        if self.obs.metrics:
            self._count(protocol, model, klass, code, elapsed, outcome if status < 400 else None,
                        key_label(seen["key_id"], self.obs.metrics_key_labels))
        if access.isEnabledFor(logging.INFO):
            _log(response, seen, protocol, elapsed, code)
        self.tracing.end(seen["span"], attributes={"http.response.status_code": status},
                         error=str(status) if status >= 500 else None)

    def _count(self, protocol: str, model: str, klass: str, code: str | None, elapsed: float,
               outcome: dict[str, Any] | None, key: str | None) -> None:
        m = self.metrics
        m.of(m.requests, protocol, model, klass).inc()
        m.of(m.request_seconds, protocol, model, klass).observe(elapsed)
        if code is not None:
            m.of(m.request_errors, protocol, model, code).inc()
        if outcome is not None:
            inside = float(outcome.get("queue_wait_ms") or 0) + float(outcome.get("upstream_latency_ms") or 0)
            m.of(m.overhead_seconds, protocol).observe(max(0.0, elapsed - inside / 1000))
        if key is not None:
            m.of(m.key_requests, key, klass).inc()


def _log(response: Response, seen: dict[str, Any], protocol: str, elapsed: float, code: str | None) -> None:
    """The request's ``gateway.access`` line: ids, names, status, timings — no content, no secret."""
    headers = response.headers
    fields = {"request_id": seen["request_id"], "method": seen["method"], "path": seen["path"],
              "status": response.status_code, "duration_ms": round(elapsed * 1000, 1), "protocol": protocol,
              "model": seen["model"], "provider": headers.get("x-gateway-provider"),
              "provider_model": headers.get("x-gateway-model"),
              "job_id": seen["job_id"] or headers.get("x-gateway-job-id"), "key_id": seen["key_id"],
              "queue_wait_ms": headers.get("x-gateway-queue-wait-ms"),
              "upstream_ms": (seen["outcome"] or {}).get("upstream_latency_ms"),
              "cost_usd": headers.get("x-gateway-cost-usd"), "error": code}
    access.info("request", extra={"fields": {k: v for k, v in fields.items() if v not in (None, "")}})


def _error_code(response: Response) -> str:
    """The error's code from an error body in OpenAI's shape (``{"error": {"code": ...}}``), bounded by
    our hierarchy's codes; other shapes (Anthropic, Ollama) by the HTTP status class."""
    klass = status_class(response.status_code)
    if response.is_streamed or response.mimetype != "application/json":
        return klass
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code in error_codes() else klass


def install(app: Flask, settings: Settings) -> ApiObserver:
    """Logging configured (level, format) and the observer kept on the app. Under gunicorn's gevent
    worker (the standard library patched) the access lines are written in batches from the event loop
    (:class:`~common.observability.logs.BatchingStreamHandler`): a write per request costs a system
    call and a wake-up of ``up``'s console each."""
    configure_logging(settings.observability,
                      schedule=gevent.spawn_later if monkey.is_module_patched("threading") else None)
    ensure_metrics_dir(settings.observability.metrics_dir)
    observer = ApiObserver(settings, app)
    if observer.active:
        app.extensions[EXTENSION] = observer
    return observer


def begin() -> None:
    """The request starts (``before_request``)."""
    g.obs_t0 = time.perf_counter()
    g.obs_wall = time.time()


def note_job(job_id: str, spec: JobSpec) -> JobSpec:
    """The gateway queues ``spec`` as ``job_id`` for this request: remembered for its log line and
    metrics; with tracing on, the request's span starts and its context rides in the returned spec."""
    if not has_request_context():
        return spec
    g.obs_job_id, g.obs_model = job_id, spec.model
    observer: ApiObserver | None = current_app.extensions.get(EXTENSION)
    if observer is None or not observer.tracing.enabled:
        return spec
    span = observer.tracing.start(f"{request.method} {request.url_rule or request.path}", kind="SERVER",
                                  start=g.get("obs_wall", time.time()),
                                  traceparent=request.headers.get("traceparent"),  # the caller's trace
                                  attributes={"http.request.method": request.method,
                                              "url.path": request.path, "gateway.job_id": job_id,
                                              "gateway.request_id": g.get("request_id", ""),
                                              "gateway.model": spec.model})
    g.obs_span = span
    return dataclasses.replace(spec, trace=observer.tracing.traceparent(span))


def note_outcome(meta: dict[str, Any]) -> None:
    """A job's result arrived with ``meta`` (queue wait, upstream latency): what the gateway added is
    the rest of the request's time."""
    if has_request_context():
        g.obs_outcome = meta


def finish(response: Response) -> Response:
    """``after_request``: record the request once its body is sent (a stream's included)."""
    observer: ApiObserver | None = current_app.extensions.get(EXTENSION)
    started = g.get("obs_t0")
    if observer is None or started is None:
        return response
    seen = _seen(started)
    response.call_on_close(lambda: observer.record(response, seen))
    return response


def _seen(started: float) -> dict[str, Any]:
    return {"t0": started, "blueprint": request.blueprint.split(".")[0] if request.blueprint else None,
            "method": request.method, "path": request.path, "request_id": g.get("request_id"),
            "key_id": g.get("api_key_id"), "model": g.get("obs_model"), "job_id": g.get("obs_job_id"),
            "outcome": g.get("obs_outcome"), "span": g.get("obs_span")}
