"""The sync calls this API process holds never wait on a job whose queue message was lost.

A worker SIGKILLed at the instant Redis answers its BRPOP takes the message along (kombu had not
recorded it in ``unacked`` yet): the job stays ``queued``, never claimed, and nothing would run it.
An async job is repaired by the workers' reconciler (from its Postgres row); a sync job lives in
Redis only, and only this process knows it waits. So every :data:`PASS_EVERY_S` seconds this process
looks at the jobs it has held for longer than :data:`GRACE_S`: those still waiting for their first
claim whose message is in neither their queue nor ``unacked`` get it again
(``common/redeliver.py``, shared with the reconciler). The caller then gets its answer instead of a
429 at its max_wait; a duplicate message is harmless (the claim lets one delivery run the job).

A pass costs nothing when no held job is older than the grace, and one pipeline of ``HMGET`` when none
of those waits for its first claim (the usual case: they run or stand in a provider's line).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from common.jobs import JobStore
from common.redeliver import first_claim_waiters, redeliver_messageless
from common.settings import Settings

log = logging.getLogger(__name__)

PASS_EVERY_S = 5.0   # how often the held jobs are looked at
GRACE_S = 10.0       # a job held for less is left alone: its message is surely on its way
BATCH = 1000         # held jobs looked at per pipeline


class SyncRedelivery:
    """One pass (:meth:`tick`) over the sync jobs an API process holds; :meth:`run` repeats it."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def tick(self, held: list[str]) -> list[str]:
        """Queue a message again for each of ``held`` (jobs held past the grace) that waits for its
        first claim and has no message anywhere; returns their ids."""
        redelivered: list[str] = []
        for start in range(0, len(held), BATCH):
            waiting = first_claim_waiters(self.store, held[start:start + BATCH])
            redelivered += redeliver_messageless(self.store, self.settings, waiting)
        if redelivered:
            log.warning("%d held sync call(s) had lost their queue message (a worker died as it took "
                        "it) and were queued again: %s", len(redelivered), ", ".join(redelivered))
        return redelivered

    def run(self, held_before: Callable[[float], list[str]]) -> None:
        """Forever: every :data:`PASS_EVERY_S`, :meth:`tick` over the jobs ``held_before`` names as
        held since before ``now - GRACE_S`` (monotonic). A Redis hiccup only skips a pass."""
        while True:
            time.sleep(PASS_EVERY_S)
            try:
                held = held_before(time.monotonic() - GRACE_S)
                if held:
                    self.tick(held)
            except (redis.RedisError, OSError) as exc:
                log.warning("held sync calls' queue check failed (%s); retrying in %.0fs", exc, PASS_EVERY_S)
