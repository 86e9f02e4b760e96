"""The gateway's Prometheus metrics: their names, labels and buckets (the table in docs/metrics.md),
one set per process, and how ``GET /metrics`` renders them.

Multi-process: gunicorn's workers and each Celery worker are separate processes, so with
``PROMETHEUS_MULTIPROC_DIR`` set (``up`` and the test fixtures set it, cleared at start) every process
on a host writes its samples to files there and ``/metrics`` on that host's API aggregates them all
(prometheus-client's multiprocess mode): one scrape target per host. Without it (one API process, a
worker on another host), each process keeps its own samples; a worker host then serves its own
(README "Operating it").

State that lives in Redis (queue and line depth, limiter use, cooldowns) is not counted by anyone: it
is read when ``/metrics`` is scraped (:class:`StateCollector`), a few pipelined reads per provider.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

#: end-to-end, upstream and time to first token: an LLM call takes from milliseconds (a cached or
#: tiny answer) to minutes (a long generation); ~2.5x steps keep percentiles honest across that range
LLM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
               300.0, 600.0)
#: waiting in line runs up to max_wait (an hour for sync, a day for async jobs)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                3600.0, 86400.0)
#: what the gateway itself adds: sub-millisecond to a second
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric one process records. Built once per process (:func:`metrics`); label values are
    bounded by the callers through ``common.observability.labels``."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        # labelled children by (metric, label values): prometheus-client validates labels on every
        # .labels() call (~5 µs); label values are bounded, so this stays small
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # API (one per HTTP request)
        self.requests = Counter("gateway_requests", "HTTP requests answered by the API",
                                ["protocol", "model", "status_class"], registry=r)
        self.request_errors = Counter("gateway_request_errors", "HTTP requests answered with an error, "
                                      "by error code", ["protocol", "model", "code"], registry=r)
        self.request_seconds = Histogram("gateway_request_duration_seconds", "end-to-end latency at the "
                                         "API (a stream: until its last byte)",
                                         ["protocol", "model", "status_class"], buckets=LLM_BUCKETS,
                                         registry=r)
        self.overhead_seconds = Histogram("gateway_overhead_seconds", "what the gateway added to a "
                                          "non-streamed call: end-to-end minus queue wait minus upstream",
                                          ["protocol"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.key_requests = Counter("gateway_key_requests", "HTTP requests by API key (only with "
                                    "GATEWAY_METRICS_KEY_LABELS=on)", ["api_key", "status_class"], registry=r)
        # workers (one per job / upstream attempt)
        self.queue_wait_seconds = Histogram("gateway_queue_wait_seconds", "job created → started by a "
                                            "worker (broker queue + the provider's line)",
                                            ["provider", "model"], buckets=WAIT_BUCKETS, registry=r)
        self.upstream_seconds = Histogram("gateway_upstream_duration_seconds", "one upstream attempt",
                                          ["provider", "model", "outcome"], buckets=LLM_BUCKETS, registry=r)
        self.upstream_attempts = Counter("gateway_upstream_attempts", "upstream attempts by outcome "
                                         "(success or our error code)", ["provider", "model", "outcome"],
                                         registry=r)
        self.retries = Counter("gateway_retries", "upstream attempts retried (or re-waited in line)",
                               ["provider", "model", "reason"], registry=r)
        self.ttft_seconds = Histogram("gateway_time_to_first_token_seconds", "streamed calls: upstream "
                                      "call start → first chunk", ["provider", "model"], buckets=LLM_BUCKETS,
                                      registry=r)
        self.tokens = Counter("gateway_tokens", "tokens billed by upstreams", ["provider", "model",
                                                                               "direction"], registry=r)
        self.cost_usd = Counter("gateway_cost_usd", "cost of upstream calls, USD", ["provider", "model"],
                                registry=r)
        self.jobs_finished = Counter("gateway_jobs_finished", "jobs settled by a worker, by final state",
                                     ["provider", "model", "state"], registry=r)
        self.key_tokens = Counter("gateway_key_tokens", "tokens by API key (opt in)",
                                  ["api_key", "direction"], registry=r)
        self.key_cost_usd = Counter("gateway_key_cost_usd", "cost by API key, USD (opt in)", ["api_key"],
                                    registry=r)
        # hooks for routing, budgets and the cache (common/observability/hooks.py)
        self.fallbacks = Counter("gateway_fallbacks", "jobs moved to the next deployment of their route",
                                 ["model", "from_provider", "to_provider", "reason"], registry=r)
        self.cache = Counter("gateway_cache_lookups", "response cache lookups", ["model", "result"],
                             registry=r)
        self.breaker_state = Gauge("gateway_breaker_state", "circuit breaker per provider: 0 closed, "
                                   "1 half-open, 2 open", ["provider"], multiprocess_mode="mostrecent",
                                   registry=r)
        self.budget_remaining_usd = Gauge("gateway_budget_remaining_usd", "what is left of a budget, USD",
                                          ["budget"], multiprocess_mode="mostrecent", registry=r)


    def of(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


_lock = threading.Lock()
_metrics: Metrics | None = None
_registry: CollectorRegistry | None = None


def ensure_metrics_dir(metrics_dir: Path | None) -> None:
    """A process about to record makes sure the shared directory exists (prometheus-client would fail
    every write otherwise); it never empties it — other processes' samples are in it."""
    if metrics_dir is not None:
        metrics_dir.mkdir(parents=True, exist_ok=True)


def metrics() -> Metrics:
    """This process's metrics, created on first use (never at import). In multiprocess mode the
    values go to the shared directory (``PROMETHEUS_MULTIPROC_DIR``, read by prometheus-client
    itself), else to this process's registry that :func:`exposition` renders."""
    global _metrics, _registry
    with _lock:
        if _metrics is None:
            _registry = CollectorRegistry(auto_describe=True)
            _metrics = Metrics(_registry)
        return _metrics


def exposition(metrics_dir: Path | None, state: Iterable[Any] = ()) -> bytes:
    """The text ``GET /metrics`` answers: every process's samples on this host (``metrics_dir``), or
    this process's, plus the collectors in ``state`` (read at scrape time)."""
    registry = _samples(metrics_dir)
    for collector in state:
        registry.register(collector)
    return generate_latest(registry)


class _Forward:
    """Collects another registry (this process's own metrics) into the scrape's registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return iter(self.source.collect())


class StateCollector:
    """Gauges read from Redis when ``/metrics`` is scraped: each provider's broker queue depth and
    line, limiter use against its limits, and cooldown. ``read`` returns ``Gateway.limits()``'s
    shape ({provider: {queue_depth, waiting_in_line, cooldown_ms, scopes: {...}}})."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("gateway_queue_depth", "jobs in the provider's broker queue",
                                  labels=["provider"])
        line = GaugeMetricFamily("gateway_line_length", "jobs held by workers, waiting for a permit",
                                 labels=["provider"])
        cooldown = GaugeMetricFamily("gateway_cooldown_seconds", "time left on the cooldown an upstream "
                                     "429 imposed", labels=["provider"])
        in_use = GaugeMetricFamily("gateway_limit_in_use", "use of a limit now: concurrency in flight, "
                                   "requests and tokens in the last 60 s", labels=["scope", "limit"])
        limit = GaugeMetricFamily("gateway_limit", "a configured limit", labels=["scope", "limit"])
        for provider, entry in self.read().items():
            queue.add_metric([provider], float(entry.get("queue_depth", 0)))
            line.add_metric([provider], float(entry.get("waiting_in_line", 0)))
            cooldown.add_metric([provider], float(entry.get("cooldown_ms", 0)) / 1000)
            for scope, use in entry.get("scopes", {}).items():
                for name, now in (("concurrency", use.get("in_flight")),
                                  ("rpm", use.get("requests_last_60s")), ("tpm", use.get("tokens_last_60s"))):
                    configured = use.get("limits", {}).get(name)
                    if configured:
                        in_use.add_metric([scope, name], float(now or 0))
                        limit.add_metric([scope, name], float(configured))
        yield from (queue, line, cooldown, in_use, limit)


def prepare_metrics_dir(path: Path) -> Path:
    """``path`` created and emptied: a run's samples must not add to a previous run's (multiprocess
    mode keeps one file per process and metric type; a dead process's counters still count)."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


def serve(port: int, metrics_dir: Path | None) -> None:
    """Serve ``/metrics`` on ``port`` from a background thread (a worker host without an API): every
    process's samples in ``metrics_dir`` on this host, or this process's."""
    from prometheus_client import start_http_server

    start_http_server(port, registry=_samples(metrics_dir))


def _samples(metrics_dir: Path | None) -> CollectorRegistry:
    """A registry that collects every process's samples in ``metrics_dir``, or this process's."""
    registry = CollectorRegistry(auto_describe=False)
    if metrics_dir is not None:
        MultiProcessCollector(registry, path=str(metrics_dir))
    else:
        metrics()
        assert _registry is not None
        registry.register(_Forward(_registry))
    return registry
