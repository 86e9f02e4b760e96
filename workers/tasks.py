"""Celery tasks. Plain functions that take ids; the work is in :mod:`workers.runner`."""

from __future__ import annotations

import logging

from celery import Task, shared_task
from celery.exceptions import Reject

from common.taskwire import TASK_NAME
from workers.admission import StopAdmitting
from workers.assembly import build_runner
from workers.runner import JobRunner
from workers.settle import OutcomeNotDurable
from workers.shutdown import wait_until_not_consuming

log = logging.getLogger(__name__)


def _runner(task: Task) -> JobRunner:
    app = task.app
    runner = getattr(app, "gateway_runner", None)
    if runner is None:  # built once per worker process, on its first job
        runner = app.gateway_runner = build_runner(app.gateway_settings)
    return runner


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self: Task, job_id: str) -> str:
    runner = _runner(self)
    try:
        return runner.run(job_id)
    except StopAdmitting as exc:
        # the worker is stopping (workers/shutdown.py) and the job did not start: back on its queue,
        # once this worker no longer takes messages (else it would take this one straight back)
        wait_until_not_consuming(getattr(self.app, "gateway_consumer", None), runner.settings.drain_timeout)
        log.info("%s; its message goes back on the queue", exc)
        raise Reject(str(exc), requeue=True) from exc
    except OutcomeNotDurable as exc:
        # neither Redis nor Postgres holds what the job came to: never ack it (nor settle it as failed);
        # its message goes back — or, Redis being down, stays unacked until the broker restores it
        log.error("%s; the job's message is put back for redelivery", exc)
        raise Reject(str(exc), requeue=True) from exc
    except Exception:
        # a bug or an exhausted resource (e.g. EMFILE): never leave the caller waiting for a job that
        # will not run — settle it as failed (if it has not settled) so the caller hears at once
        log.exception("job %s: unexpected error", job_id)
        runner.fail_unexpectedly(job_id)
        raise
