"""Entry point for ``celery -A workers.worker:app`` (what ``llm-gateway worker`` / ``flower`` run)."""

from typing import Any

from celery.signals import worker_ready

from common.settings import load_settings
from workers.celery_app import make_celery, restore_interval
from workers.kombu_tuning import tune_kombu_redis
from workers.redelivery import RedeliverySweeper
from workers.runner import build_runner

tune_kombu_redis()
app = make_celery(load_settings())


@worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    """The threads a worker runs besides its jobs start with it, not with its first job: the usage
    flusher, the reconciler of lost async jobs (both in ``build_runner``) and the redelivery sweep."""
    if getattr(app, "gateway_runner", None) is None:
        app.gateway_runner = build_runner(app.gateway_settings)  # type: ignore[attr-defined]
    RedeliverySweeper(app, restore_interval(app.gateway_settings)).start()
