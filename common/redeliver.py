"""A queued job whose broker message is gone gets it back.

Celery's Redis transport takes a message with BRPOP, which removes it from its queue list as Redis
replies; kombu records it in ``<prefix>:unacked`` only after reading that reply. A worker SIGKILLed
in between takes the message with it: the job's live state still says ``queued`` — never claimed,
no holder — but its message is in neither the queue nor ``unacked``, and nothing would ever run it.

Two callers look for such jobs and use this module, so the test and the repair exist once:

* ``workers/reconciler.py`` for async jobs (durable rows in Postgres);
* ``api/redeliver.py`` for sync jobs (Redis only), each API process for the callers it holds.

A duplicate message (one that was in flight between a worker's BRPOP and its ``unacked`` write as
we looked) is harmless: the claim (``common/lua/job.lua``) lets exactly one delivery run the job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from common.contract import JobSpec
from common.jobs import JobStore
from common.settings import Settings
from common.taskwire import task_message

log = logging.getLogger(__name__)


def waits_for_first_claim(live: Sequence[bytes | None]) -> bool:
    """A live job (``state``, ``holder``, ``attempts``) that waits for its first claim outside any line."""
    state, holder, attempts = live
    return state == b"queued" and not holder and attempts in (None, b"0")


def first_claim_waiters(store: JobStore, job_ids: Sequence[str]) -> dict[str, str]:
    """Of ``job_ids``, the live jobs that wait for their first claim, each with the provider whose
    queue must hold its message: its live spec's (where routing put it). A job never claimed was
    never moved either (a move is a running job's, ``job_requeue``), but the spec says so for sure.
    One pipeline for the states, one more only for the jobs that wait (usually none)."""
    if not job_ids:
        return {}
    pipe = store.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(store.job_key(job_id), "state", "holder", "attempts")
    waiting = [job_id for job_id, live in zip(job_ids, pipe.execute(), strict=True)
               if waits_for_first_claim(live)]
    if not waiting:
        return {}
    pipe = store.redis.pipeline(transaction=False)
    for job_id in waiting:
        pipe.hget(store.job_key(job_id), "spec")
    return {job_id: JobSpec.parse(raw, 0.0).provider
            for job_id, raw in zip(waiting, pipe.execute(), strict=True) if raw is not None}


def redeliver_messageless(store: JobStore, settings: Settings, waiting: Mapping[str, str]) -> list[str]:
    """Queue a message again for each job of ``waiting`` (job id → provider; jobs whose live state
    waits for its first claim, see :func:`first_claim_waiters`) that has no message in its provider's
    queue nor in kombu's ``unacked``. One pipeline reads every involved queue and ``unacked``; a job
    of a provider this deployment no longer has is left alone. Returns the ids queued again."""
    waiting = {job_id: provider for job_id, provider in waiting.items()
               if provider in settings.registry.providers}
    if not waiting:
        return []
    queues = {provider: settings.queue_key(provider) for provider in waiting.values()}
    pipe = store.redis.pipeline(transaction=False)
    for key in queues.values():
        pipe.lrange(key, 0, -1)
    pipe.hvals(f"{store.prefix}:unacked")   # kombu's, under our global_keyprefix
    *listed, unacked = pipe.execute()
    held = b"\n".join([*(entry for entries in listed for entry in entries), *unacked])
    redelivered = []
    for job_id, provider in waiting.items():
        if job_id.encode() in held:
            continue
        store.redis.rpush(queues[provider], task_message(job_id, settings.queue_for(provider)))
        log.info("job %s: queued but its message was gone (a worker died as it took it); queued again",
                 job_id)
        redelivered.append(job_id)
    return redelivered
