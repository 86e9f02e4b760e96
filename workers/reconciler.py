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
The first pass runs as the worker starts (after a restart, lost jobs run at once, not one interval
later); each pass that found something says so in one warning with its counts (:func:`summary`), the
start-up pass says "nothing to recover" at info.

It also queues a message again for a row still ``queued`` whose live job waits for its first claim
(no holder, no attempt) but whose message is in neither its queue nor kombu's ``unacked``: a worker
SIGKILLed while Redis's BRPOP reply was on its way took it along
(:meth:`JobReconciler.redeliver_messageless`, ``common/redeliver.py``; the API does the same for the
sync calls it holds, ``api/redeliver.py``).

It also repairs the opposite: a row still ``queued`` or ``running`` whose live state has settled (a
worker died between a Lua step that settled the job and its row's write, or the API between
withdrawing a job and cancelling its row). The row takes the live state and what the job's final
event says (its result or error). A job whose outcome waits on the outbox (``common/outbox.py``,
marked ``outbox`` on the job) is left to the flushers, which write it with its usage row.
A job recreated twice (two reconcilers, or a message that survived) still runs once: the claim in
``common/jobs.py`` lets only one worker move it out of ``queued``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import redis
from sqlalchemy.exc import SQLAlchemyError

from common.contract import EVENT_TTL_S, TERMINAL, Failed, JobState, Result
from common.db import Job
from common.errors import QueueTimeout
from common.jobrows import JobRows, spec_of
from common.jobs import JobStore, StreamEvent
from common.outbox import RowOutcome
from common.redeliver import redeliver_messageless, waits_for_first_claim
from common.settings import Settings
from common.taskwire import task_message
from workers.periodic import Periodic

log = logging.getLogger(__name__)

GRACE_S = 10.0     # a row younger than this may not have its live state yet
BATCH = 500        # rows looked at per pass
_TERMINAL = frozenset(state.value for state in TERMINAL)


class JobReconciler(Periodic):
    name = "job-reconciliation"
    retry_on = (redis.RedisError, SQLAlchemyError, OSError)
    tick_at_start = True

    def __init__(self, settings: Settings, store: JobStore, rows: JobRows) -> None:
        super().__init__(settings.reconcile_interval)
        self.settings = settings
        self.store = store
        self.rows = rows
        self._passes = 0

    def tick(self) -> dict[str, int] | None:
        """One pass (None if another worker process is on it); logs and returns how many jobs were
        queued again, expired, and whose row was repaired."""
        at_start = self._passes == 0
        lock = f"{self.store.prefix}:reconcile"
        # the start-up pass takes no turn: another process's lock may last a whole interval, and a job
        # queued again by two passes still runs once (create-if-missing, then the atomic claim)
        if not at_start and not self.store.redis.set(
                lock, 1, nx=True, px=int(max(self.settings.reconcile_interval, 1) * 900)):
            return None
        done = self.reconcile()
        self._passes += 1
        line = summary(done, at_start=at_start)
        if line is not None:
            log.log(logging.WARNING if any(done.values()) else logging.INFO, "%s", line)
        return done

    def reconcile(self) -> dict[str, int]:
        """One pass without the lock: requeue or expire the lost async jobs, repair settled rows."""
        stuck_s = self.settings.task_time_limit + self.settings.visibility_timeout
        rows = self.rows.lost_candidates(grace_s=GRACE_S, stuck_s=stuck_s, limit=BATCH)
        pipe = self.store.redis.pipeline(transaction=False)
        for job in rows:
            pipe.hmget(self.store.job_key(job.id), "state", "holder", "attempts")
        live = dict(zip((job.id for job in rows), pipe.execute() if rows else [], strict=True))
        lost = [job for job in rows if live[job.id][0] is None]
        unclaimed = [job for job in rows if waits_for_first_claim(live[job.id])]
        done = {"requeued": 0, "expired": 0, "repaired": self.repair_settled(),
                "redelivered": self.redeliver_messageless(unclaimed)}
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
                                        ttl=remaining + EVENT_TTL_S,
                                        queue=self.settings.queue_key(job.provider),
                                        message=task_message(job.id, queue), only_if_missing=True)
            if created is not None:
                log.info("job %s: its live state was lost (Redis restarted?); queued again on %s",
                         job.id, queue)
                done["requeued"] += 1
        return done

    def redeliver_messageless(self, unclaimed: list[Job]) -> int:
        """Queue a message again for each of ``unclaimed`` (rows older than the grace whose live job is
        ``queued`` and was never claimed nor stood in a line) that has no message in its queue nor in
        kombu's ``unacked`` (``common/redeliver.py``). Returns how many were queued again."""
        waiting = {job.id: job.provider for job in unclaimed}
        return len(redeliver_messageless(self.store, self.settings, waiting))

    def repair_settled(self) -> int:
        """Settle the open rows whose live state settled without them; returns how many."""
        rows = self.rows.open_rows(grace_s=GRACE_S, limit=BATCH)
        pipe = self.store.redis.pipeline(transaction=False)
        for job in rows:
            pipe.hmget(self.store.job_key(job.id), "state", "outbox", "finished_at")
        repaired = 0
        for job, (state, outbox, finished) in zip(rows, pipe.execute() if rows else [], strict=True):
            if state is None or outbox is not None or state.decode() not in _TERMINAL:
                continue  # lost (see tick), the outbox's to write, or still live
            self.rows.settle_late(live_outcome(job.id, JobState(state.decode()), finished,
                                               self.store.read_events(job.id)))
            log.info("job %s: its row said %s after the job had %s; repaired", job.id, job.status,
                     state.decode())
            repaired += 1
        return repaired

    def _expire(self, job: Job) -> None:
        error = QueueTimeout("the job's queue state was lost and its max_wait passed before it could be "
                             "queued again; submit it again").to_dict()
        self.rows.settle(job.id, JobState.EXPIRED, error=error)
        log.info("job %s: its live state was lost and its deadline passed; marked expired", job.id)


def summary(done: dict[str, int], *, at_start: bool) -> str | None:
    """What one reconcile pass did, in an operator's words — None for a quiet periodic pass."""
    when = "start-up check" if at_start else "queue check"
    if not any(done.values()):
        return f"{when}: every accepted async job is accounted for; nothing to recover" if at_start else None
    parts = []
    if done["requeued"]:
        parts.append(f"{done['requeued']} accepted async job(s) had lost their place in the queue (Redis "
                     "restarted without them) and were queued again; they run now")
    if done["expired"]:
        parts.append(f"{done['expired']} lost job(s) had passed their max_wait and were marked expired "
                     "(their callers see queue_timeout)")
    if done.get("redelivered"):
        parts.append(f"{done['redelivered']} accepted async job(s) had lost their queue message (a worker "
                     "died as it took them) and were queued again")
    if done["repaired"]:
        parts.append(f"{done['repaired']} job record(s) in Postgres lagged behind their finished job "
                     "and were brought up to date")
    return f"{when}: " + "; ".join(parts)


def live_outcome(job_id: str, state: JobState, finished: bytes | None,
                 events: list[StreamEvent]) -> RowOutcome:
    """The row outcome a settled live job implies: its state, when it finished (the live state's
    ``finished_at``, epoch seconds; else now) and the result or error of its final event, if any."""
    final = next((entry.event for entry in reversed(events) if entry.event.final), None)
    at = datetime.fromtimestamp(float(finished), UTC) if finished else datetime.now(UTC)
    return RowOutcome(job_id, state, at, result=final.result if isinstance(final, Result) else None,
                      error=final.error if isinstance(final, Failed) else None)
