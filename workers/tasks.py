"""Celery tasks. Plain functions that take ids; the work is in :mod:`workers.runner`."""

from __future__ import annotations

from celery import Task, shared_task

from workers.celery_app import TASK_NAME
from workers.runner import JobRunner, build_runner


def _runner(task: Task) -> JobRunner:
    app = task.app
    runner = getattr(app, "gateway_runner", None)
    if runner is None:  # built once per worker process, on its first job
        runner = app.gateway_runner = build_runner(app.gateway_settings)
    return runner


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self: Task, job_id: str) -> str:
    return _runner(self).run(job_id)
