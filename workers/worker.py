"""Entry point for ``celery -A workers.worker:app`` (what ``llm-gateway worker`` / ``flower`` run)."""

from common.settings import load_settings
from workers.celery_app import make_celery

app = make_celery(load_settings())
