"""The Celery app, configured from :class:`Settings` — shared by the API (producer) and workers.

Delivery guarantees, and why each setting is what it is:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acked only after its job settled,
  so a worker that dies mid-call leaves the message to be redelivered, not lost.
* ``worker_prefetch_multiplier = 1``: a worker reserves only what its pool can start now; queued work
  stays in the shared queue where any worker (on any machine) can take it.
* ``visibility_timeout`` > max_wait + task time limit: Redis redelivers an unacked message after this
  long, so it must outlast any legitimate run or a slow job would run twice. Abandoned messages are
  swept every ``unacked_restore_interval`` seconds (kombu's default sweep is ~100 s).
* No result backend: results travel on per-job Redis streams (``common.jobs``), which also carry streams.
  ``result_backend_thread_safe``: Celery keeps its (disabled) backend per thread, and under gevent every
  task is a new "thread" — so it built a ``DisabledBackend`` (``Backend.__init__``: config look-ups) for
  every task, ~1 % of a worker's CPU; one shared instance does nothing any less.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from common.settings import Settings


def restore_interval(settings: Settings) -> int:
    """Seconds between sweeps for abandoned messages: a fifth of the visibility timeout, 1..10 s."""
    return max(1, min(10, int(settings.visibility_timeout / 5)))


def make_celery(settings: Settings) -> Celery:
    if settings.redis_url is None:
        raise ValueError("REDIS_URL is required to build the Celery app")
    app = Celery("llm_gateway", set_as_current=False)
    visibility = settings.visibility_timeout
    app.conf.update(
        broker_url=settings.redis_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": restore_interval(settings),
            "unacked_restore_throttle": 1,
            # synchronous broker connections per channel; a greenlet finding all busy waits for one
            # (workers/kombu_tuning.py) — never fewer than a burst of acks from a wide pool needs
            "max_connections": 32,
            # every broker key under our prefix: gateways (and test runs) can share one Redis
            "global_keyprefix": f"{settings.key_prefix}:",
        },
        broker_pool_limit=64,
        task_ignore_result=True,
        result_backend=None,
        result_backend_thread_safe=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=settings.task_events,
        task_serializer="json",
        accept_content=["json"],
        task_create_missing_queues=True,
        # every provider queue, declared: Flower lists them (even before it has inspected a worker)
        task_queues=[Queue(settings.queue_for(name)) for name in settings.registry.providers],
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        include=["workers.tasks"],
    )
    app.gateway_settings = settings
    return app

