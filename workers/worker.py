"""Entry point for ``celery -A workers.worker:app`` (what ``llm-gateway worker`` / ``flower`` run).

``celery -A`` needs an app object at import, so this module — imported by Celery and nothing else — is
the worker's start-up: it reads the settings once and calls :func:`create_worker_app`. Every other
module is free of import-time work.
"""

import sys
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from common.observability.metrics import serve as serve_metrics
from common.settings import Settings, load_settings
from workers import celery_tuning, kombu_tuning
from workers.assembly import build_runner
from workers.celery_app import make_celery, restore_interval
from workers.leases import LeaseSweeper
from workers.redelivery import RedeliverySweeper
from workers.shutdown import GracefulStop, outside_the_hub, wake_consumer


def greenlet_now() -> Any:
    """The running greenlet, or None outside gevent (nothing to wake then)."""
    gevent = sys.modules.get("gevent")
    return gevent.getcurrent() if gevent is not None else None


def create_worker_app(settings: Settings) -> Celery:
    """The worker's Celery app: kombu's fixes installed first (before any broker channel exists), task
    events batched off the job's path (``workers/celery_tuning.py``); the threads a worker runs besides
    its jobs start with it, not with its first job — the usage flusher,
    the reconciler of lost async jobs (both in ``build_runner``), the redelivery sweep (the visibility
    timeout's) and the lease sweep (a dead worker's jobs, in seconds: ``workers/leases.py``)."""
    kombu_tuning.install()
    app = make_celery(settings)
    celery_tuning.install(app)

    @worker_ready.connect(weak=False)
    def _start_background(sender: Any = None, **_: Any) -> None:
        if getattr(app, "gateway_runner", None) is None:
            app.gateway_runner = build_runner(settings)
        runner = app.gateway_runner
        app.gateway_consumer = sender   # worker_ready's sender: the consumer (its stop: workers/shutdown.py)
        app.gateway_loop = greenlet_now()   # the consumer's loop calls worker_ready: the greenlet to wake
        RedeliverySweeper(app, restore_interval(settings)).start()
        LeaseSweeper(app, runner.store, runner.admission.limiter.proc_key("")).start()
        if settings.observability.worker_metrics_port:  # a worker host without an API: its own /metrics
            serve_metrics(settings.observability.worker_metrics_port, settings.observability.metrics_dir)

    @worker_shutting_down.connect(weak=False)
    def _stop_gracefully(sender: Any = None, how: str = "", **_: Any) -> None:
        """Called from Celery's signal handler — under gevent, in a hub callback where nothing may
        block: the graceful stop starts in a greenlet of its own. Only the first signal counts: a warm
        stop after a cold one (SIGTERM after SIGQUIT) starts none — the cold one is the crash path
        (kombu restores) — and a cold one after a warm one is Celery's own (it cancels the tasks)."""
        stopping_already = getattr(app, "gateway_stopping", False)
        app.gateway_stopping = True
        if stopping_already:
            return
        runner = getattr(app, "gateway_runner", None)
        if runner is not None and how == "Warm":
            outside_the_hub(GracefulStop(runner, settings.drain_timeout).begin)
        wake_consumer(getattr(app, "gateway_loop", None))   # once: later it may be in Celery's stop

    return app


app = create_worker_app(load_settings())
