"""Async jobs that Redis lost are queued again: an accepted job is never forgotten.

An async job is durable in Postgres (``jobs``), but its live state and its queue message live in
Redis. A Redis that restarts without persistence (the embedded default; any Redis without AOF)
forgets both: the row says ``queued`` forever and nothing will ever run it. So every worker process
runs a :class:`JobReconciler`; every ``GATEWAY_RECONCILE_INTERVAL`` seconds (30) one of them (a
Redis lock) looks at the rows still ``queued`` — or ``running`` for longer than any run may take —
whose live state is gone, and

* queues them again (state and message in one step, and only if nobody recreated the job in the
  meantime), with what is left of their max_wait; or
* marks them ``expired`` if their deadline passed while they were lost.

Rows younger than ``GRACE_S`` are left alone: the API writes the row a moment before the live state.
A job recreated twice (two reconcilers, or a message that survived) still runs once: the claim in
``common/jobs.py`` lets only one worker move it out of ``queued``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import redis
from sqlalchemy.exc import SQLAlchemyError

from common.contract import EVENT_TTL_S, JobState
from common.db import Job
from common.errors import QueueTimeout
from common.jobrows import JobRows, spec_of
from common.jobs import JobStore
from common.settings import Settings
from common.taskwire import task_message
from workers.periodic import Periodic

log = logging.getLogger(__name__)

GRACE_S = 10.0     # a row younger than this may not have its live state yet
BATCH = 500        # rows looked at per pass


class JobReconciler(Periodic):
    name = "job-reconciliation"
    retry_on = (redis.RedisError, SQLAlchemyError, OSError)

    def __init__(self, settings: Settings, store: JobStore, rows: JobRows) -> None:
        super().__init__(settings.reconcile_interval)
        self.settings = settings
        self.store = store
        self.rows = rows

    def tick(self) -> dict[str, int]:
        """One pass; returns how many jobs were queued again and how many expired."""
        lock = f"{self.store.prefix}:reconcile"
        if not self.store.redis.set(lock, 1, nx=True, px=int(max(self.settings.reconcile_interval, 1) * 900)):
            return {"requeued": 0, "expired": 0}  # another worker process is on it
        rows = self.rows.lost_candidates(
            grace_s=GRACE_S, stuck_s=self.settings.task_time_limit + self.settings.visibility_timeout, limit=BATCH)
        pipe = self.store.redis.pipeline(transaction=False)
        for job in rows:
            pipe.exists(self.store.job_key(job.id))
        lost = [job for job, alive in zip(rows, pipe.execute() if rows else [], strict=True) if not alive]
        done = {"requeued": 0, "expired": 0}
        for job in lost:
            if job.provider not in self.settings.registry.providers:
                continue  # a provider this deployment no longer has: left for an operator
            remaining = (job.deadline_at - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                self._expire(job)
                done["expired"] += 1
                continue
            queue = self.settings.queue_for(job.provider)
            created = self.store.create(job.id, spec_of(job), max_wait=remaining, reply_to="",
                                        ttl=remaining + EVENT_TTL_S, queue=self.settings.queue_key(job.provider),
                                        message=task_message(job.id, queue), only_if_missing=True)
            if created is not None:
                log.warning("job %s: its live state was lost (Redis restarted?); queued again on %s", job.id, queue)
                done["requeued"] += 1
        return done

    def _expire(self, job: Job) -> None:
        error = QueueTimeout("the job's queue state was lost and its max_wait passed before it could be "
                             "queued again; submit it again").to_dict()
        self.rows.settle(job.id, JobState.EXPIRED, error=error)
        log.warning("job %s: its live state was lost and its deadline passed; marked expired", job.id)
