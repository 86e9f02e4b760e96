"""Metrics (Prometheus), structured logs and optional OpenTelemetry traces.

    labels.py    bounded label values (pure)
    metrics.py   metric definitions, buckets, the /metrics exposition and its Redis state collector
    hooks.py     one-call hooks for breakers, fallbacks, budgets and the cache
    logs.py      JSON / text log lines, level and format from settings
    tracing.py   OpenTelemetry spans (GenAI conventions), on only with OTEL_EXPORTER_OTLP_ENDPOINT

The API's and the worker's instrumentation (``api/observe.py``, ``workers/observe.py``) call these.
"""
