"""OpenTelemetry traces, optional: on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set *and* the
``[otel]`` extra is installed (``pip install 'llm-gateway[otel]'``); otherwise every call here is a
no-op costing a branch.

A call's trace (GenAI semantic conventions, https://opentelemetry.io/docs/specs/semconv/gen-ai/)::

    POST /v1/chat/completions          API, SERVER: the HTTP request
    └── chat {provider model}          worker, CLIENT: job created → settled; gen_ai.* attributes
        ├── queue                      created → delivered to a worker (the broker queue)
        ├── admission                  delivered → claimed (waiting in the provider's line for permits)
        └── upstream {provider}        one per upstream attempt

The API's span joins the caller's trace when the request carries a ``traceparent`` header. Its
context crosses to the worker inside the job's spec (``JobSpec.trace``, a W3C
``traceparent``), so the Celery message carries it with the job. Spans are made with explicit start
and end times (the worker learns when its job was created from its queue wait), so no span is held
open across processes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from common.settings import ObservabilitySettings

log = logging.getLogger(__name__)

#: gen_ai.provider.name for our provider kinds (the conventions' well-known values)
GENAI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini", "ollama": "ollama"}


def ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


class Tracing:
    """Makes spans, or nothing (``enabled`` False). ``exporter``: a span exporter to use instead of
    OTLP/HTTP (tests pass an in-memory one)."""

    def __init__(self, settings: ObservabilitySettings, exporter: Any = None) -> None:
        self.enabled = False
        self._tracer: Any = None
        self._provider: Any = None
        if settings.otlp_endpoint is None and exporter is None:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                        "(pip install 'llm-gateway[otel]'); traces are off")
            return
        provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = str(settings.otlp_endpoint).rstrip("/") + "/v1/traces"
            # exported in the background every second; a slow collector never delays a call
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint),
                                                           schedule_delay_millis=1000))
        self._provider = provider
        self._tracer = provider.get_tracer("llm-gateway")
        self.enabled = True

    def start(self, name: str, *, start: float, parent: Any = None, traceparent: str | None = None,
              kind: str = "INTERNAL", attributes: dict[str, Any] | None = None) -> Any:
        """A span started at ``start`` (epoch seconds), child of ``parent`` (a span) or of the remote
        ``traceparent``; None when tracing is off. End it with :meth:`end`."""
        if not self.enabled:
            return None
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if parent is not None:
            context = trace.set_span_in_context(parent)
        elif traceparent:
            context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
        else:
            context = None
        return self._tracer.start_span(name, context=context, kind=getattr(trace.SpanKind, kind),
                                       start_time=ns(start), attributes=attributes or {})

    def end(self, span: Any, *, end: float | None = None, attributes: dict[str, Any] | None = None,
            error: str | None = None) -> None:
        """End ``span`` (None: nothing) at ``end`` (default now) with more attributes; ``error``
        (an error type) marks it failed (``error.type``, status ERROR)."""
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if attributes:
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=ns(time.time() if end is None else end))

    def span(self, name: str, *, start: float, end: float, parent: Any, kind: str = "INTERNAL",
             attributes: dict[str, Any] | None = None, error: str | None = None) -> None:
        """A finished span (both times known)."""
        self.end(self.start(name, start=start, parent=parent, kind=kind, attributes=attributes), end=end,
                 error=error)

    def traceparent(self, span: Any) -> str | None:
        """``span``'s W3C traceparent, to carry to another process; None without a span."""
        if span is None:
            return None
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent")

    def flush(self) -> None:
        if self._provider is not None:
            self._provider.force_flush()
