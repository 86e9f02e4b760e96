"""A dead worker's jobs back on their queue in seconds, not after the broker's visibility timeout.

With ``acks_late`` a message a worker took sits in kombu's ``unacked`` hash (``<prefix>:unacked``:
delivery tag → ``[message, exchange, routing_key]``; ``<prefix>:unacked_index``: tag → delivery time)
until the worker acks it. If the worker dies, kombu puts it back only after the visibility timeout —
which must outlast the longest legitimate run (an hour by default). But the gateway knows sooner
whether a delivery's holder is alive:

* a running job has its lease (``P:job:<id>:lease``), renewed by its worker's heartbeat every third
  of ``workers.runner.LEASE_TTL_S``;
* every job names the worker process that holds its delivery (``holder`` in the job hash, written by
  the claim or the admission Lua), and every worker process keeps a heartbeat (``P:lim:proc:<id>``,
  ``workers/admission.py``) — which also covers a job waiting in a provider's line.

A delivery whose job names no holder was reserved by a worker that has not claimed it yet: it may be
about to (the claim comes milliseconds after the reservation), it may be held behind a busy pool slot,
or its worker died in between. Once it is older than ``GRACE_S`` it is put back either way: the claim
is atomic, so if the slow worker reaches its old copy later it finds the job running or settled and
never calls upstream for it (``tests/integration/test_crashes.py`` holds that window open on purpose).

So every worker process runs a :class:`LeaseSweeper`; every ``SWEEP_S`` one of them (a Redis lock)
reads the deliveries older than ``GRACE_S`` and decides each with :func:`verdict`: leave it, put it
back at the head of its queue now (kombu's own ``restore_by_tag``, a transaction), or drop it (its job
settled, or Redis no longer knows it: a leftover). A restored job whose lease lapsed is claimed again
as the next attempt (``common/lua/job.lua``) — or settled ``cancelled`` if its caller can no longer
use it. The visibility timeout stays the last resort (``workers/redelivery.py``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from celery import Celery
from kombu.exceptions import OperationalError
from kombu.transport.redis import Channel
from redis.exceptions import RedisError

from common.contract import JobState
from common.jobs import JobStore
from common.lua import ScriptBatch
from common.taskwire import TASK_NAME
from workers.periodic import Periodic

log = logging.getLogger(__name__)

SWEEP_S = 2.0    # how often one of the workers looks
GRACE_S = 5.0    # a younger delivery may not have named its holder yet (it is being claimed)
BATCH = 2000     # deliveries looked at per sweep, oldest first


class Verdict(StrEnum):
    KEEP = "keep"          # its holder is alive (or we cannot tell): leave it
    RESTORE = "restore"    # its holder died: back on the queue now
    REMOVE = "remove"      # its job settled or is unknown: the message is a leftover


@dataclass(frozen=True)
class Delivery:
    """What the sweeper knows about one unacked message's job. ``state`` None: Redis does not know
    the job; ``holder_alive`` None: no holder recorded (its worker died before claiming it)."""

    state: JobState | None
    lease: bool
    holder_alive: bool | None


def verdict(delivery: Delivery) -> Verdict:
    """Keep, restore or remove one delivery. Restoring is always safe for correctness — the claim
    lets one worker run a job once per attempt — but a delivery that is restored while its holder
    still runs the job would be claimed ``busy`` and acked, so a running job is restored only once
    its lease lapsed *and* its holder's process heartbeat is gone."""
    if delivery.state is None or delivery.state.terminal:
        return Verdict.REMOVE
    if delivery.state is JobState.RUNNING and delivery.lease:
        return Verdict.KEEP
    if delivery.holder_alive:
        return Verdict.KEEP   # queued in its holder's line, or between its redelivery and its claim
    return Verdict.RESTORE


def job_id_of(raw: bytes | str | None) -> str | None:
    """The job id of an ``unacked`` hash entry (kombu's ``[message, exchange, routing_key]``), if it
    is a ``run_job`` task message (``common/taskwire.py``); None for anything else."""
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
        headers = entry[0]["headers"]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    if not isinstance(headers, dict) or headers.get("task") != TASK_NAME:
        return None
    job_id = headers.get("id")
    return job_id if isinstance(job_id, str) and job_id else None


class LeaseSweeper(Periodic):
    name = "lease-sweep"
    retry_on = (OperationalError, RedisError, OSError)

    def __init__(self, app: Celery, store: JobStore, proc_key_prefix: str, interval: float = SWEEP_S) -> None:
        super().__init__(interval)
        self.app = app
        self.store = store
        self.proc_key_prefix = proc_key_prefix
        broker_prefix = f"{store.prefix}:"   # kombu's global_keyprefix (workers/celery_app.py)
        self.unacked_key = broker_prefix + Channel.unacked_key
        self.index_key = broker_prefix + Channel.unacked_index_key
        self.lock_key = f"{store.prefix}:leases:sweep"

    def tick(self) -> dict[Verdict, int]:
        """One sweep (if no other worker process is on it); returns how many deliveries got each verdict."""
        counts = dict.fromkeys(Verdict, 0)
        if not self.store.redis.set(self.lock_key, 1, nx=True, px=int(self.interval * 900)):
            return counts
        decided = self.decide(time.time() - GRACE_S)
        for _, what in decided.values():
            counts[what] += 1
        leftovers = [tag for tag, (_, what) in decided.items() if what is Verdict.REMOVE]
        if leftovers:
            pipe = self.store.redis.pipeline()
            pipe.zrem(self.index_key, *leftovers)
            pipe.hdel(self.unacked_key, *leftovers)
            pipe.execute()
        restore = {tag: job_id for tag, (job_id, what) in decided.items() if what is Verdict.RESTORE}
        if restore:
            self._restore(restore)
        return counts

    def decide(self, older_than: float) -> dict[str, tuple[str, Verdict]]:
        """Tag → (job id, verdict) of the deliveries made before ``older_than`` (epoch seconds)."""
        redis = self.store.redis
        tags = [_text(t) for t in cast(list[bytes], redis.zrangebyscore(
            self.index_key, "-inf", older_than, start=0, num=BATCH))]
        if not tags:
            return {}
        raws = cast(list[bytes | None], redis.hmget(self.unacked_key, tags))
        jobs = {tag: job_id for tag, raw in zip(tags, raws, strict=True) if (job_id := job_id_of(raw))}
        pipe = redis.pipeline(transaction=False)
        for job_id in jobs.values():
            pipe.hmget(self.store.job_key(job_id), "state", "holder")
            pipe.exists(self.store.lease_key(job_id))
        replies = pipe.execute() if jobs else []
        facts = {job_id: (replies[2 * i], bool(replies[2 * i + 1])) for i, job_id in enumerate(jobs.values())}
        alive = self._alive({_text(h) for (_, h), _ in facts.values() if h})
        out = {}
        for tag, job_id in jobs.items():
            (state, holder), lease = facts[job_id]
            delivery = Delivery(JobState(_text(state)) if state else None, lease,
                                alive[_text(holder)] if holder else None)
            out[tag] = (job_id, verdict(delivery))
        return out

    def _alive(self, holders: set[str]) -> dict[str, bool]:
        ordered = sorted(holders)
        pipe = self.store.redis.pipeline(transaction=False)
        for holder in ordered:
            pipe.exists(self.proc_key_prefix + holder)
        return dict(zip(ordered, (bool(n) for n in pipe.execute()), strict=True)) if ordered else {}

    def _restore(self, tags: dict[str, str]) -> None:
        # kombu's own transaction per message: it goes back (at the head of its queue: it was accepted
        # before anything queued now) only if nobody acked it meanwhile
        with self.app.connection_for_read() as connection:
            qos = connection.default_channel.qos
            for tag, job_id in tags.items():
                qos.restore_by_tag(tag, leftmost=False)
                log.warning("job %s: the worker holding it died; its message is back on its queue", job_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LeaseKeeper(Periodic):
    """Renews the leases (and concurrency permits) of every job this process runs, every third of
    the lease TTL, all in one pipelined round trip; if the worker dies they lapse.

    One thread per process, started with the first job — not one per job: a thread (a greenlet under
    gevent) started and stopped for every job cost ~0.1 ms of CPU per job and a wake-up at its end.
    A job is renewed at the first tick after it was :meth:`hold`-ed, at most a third of the TTL after
    its claim set the lease: as before. A lease that is no longer the job's execution's (the job
    was settled, moved or taken over) is not renewed again.
    """

    name = "lease-keeper"
    retry_on = (RedisError, OSError)

    def __init__(self, store: JobStore, ttl: float) -> None:
        super().__init__(ttl / 3)
        self.store = store
        self.ttl = ttl
        self._held: dict[str, tuple[str, Callable[[], object]]] = {}   # job id → execution, permit renewal
        self._lock = threading.Lock()
        self._started = False

    def hold(self, job_id: str, execution: str, renew_permit: Callable[[], object]) -> None:
        with self._lock:
            self._held[job_id] = (execution, renew_permit)
            if not self._started:
                self._started = True
                self.start()

    def release(self, job_id: str, execution: str) -> None:
        with self._lock:
            held = self._held.get(job_id)
            if held is not None and held[0] == execution:
                del self._held[job_id]

    def tick(self) -> None:
        self.renew()

    def renew(self) -> None:
        """Renew every held lease now (one round trip) and, for each still ours, its permit."""
        with self._lock:
            held = list(self._held.items())
        if not held:
            return
        batch = ScriptBatch(self.store.redis)
        for job_id, (execution, _) in held:
            self.store.renew_lease_in(batch, job_id, execution, self.ttl)
        for (job_id, (execution, renew_permit)), renewed in zip(held, batch.execute(), strict=True):
            if isinstance(renewed, Exception):
                log.warning("job %s: lease renewal failed: %s", job_id, renewed)
            elif renewed:
                self._renew_permit(job_id, renew_permit)
            else:   # no longer this execution's lease: stop renewing it
                self.release(job_id, execution)

    @staticmethod
    def _renew_permit(job_id: str, renew_permit: Callable[[], object]) -> None:
        try:
            renew_permit()
        except RedisError as exc:
            log.warning("job %s: permit renewal failed: %s", job_id, exc)
