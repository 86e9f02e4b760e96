"""Entry point for ``celery -A workers.worker:app`` (what ``llm-gateway worker`` / ``flower`` run)."""

from typing import Any

from celery.signals import worker_ready

from common.settings import load_settings
from workers.celery_app import make_celery, restore_interval
from workers.kombu_tuning import tune_kombu_redis
from workers.redelivery import RedeliverySweeper

tune_kombu_redis()
app = make_celery(load_settings())


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    RedeliverySweeper(app, restore_interval(app.gateway_settings)).start()
