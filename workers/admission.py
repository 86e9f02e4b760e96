"""Waiting in line for a provider's permits, inside a worker process.

A job delivered to a worker joins its provider's line (``common/limits.py``) and its greenlet sleeps
until the line's head changes to it (one pubsub subscription per process, ``P:lim:wake``), or until the
time the head was told a permit frees (a sliding-window slot, a cooldown), or its deadline — never a
busy poll (only a rare safety re-check, :func:`recheck_after`), and never a ``retry(countdown)`` that
would reorder the queue or outlive the visibility timeout. The job stays ``queued`` while it waits,
so the API can still withdraw it at its max_wait.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import redis

from common.contract import Start
from common.limits import Attempt, Limiter, Scope
from common.registry import Limits, Model, Provider, Registry

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
PROC_TTL_S = 15.0
IDLE_RECHECK_S = 5.0     # the head and the jobs just behind it re-check this often without a wake ...
MAX_RECHECK_S = 60.0     # ... and the rest less often the further back they stand (see recheck_after)


def recheck_after(rank: int) -> float:
    """Seconds a job at ``rank`` (0 = head) sleeps before re-checking its line if nobody wakes it.

    Wakes are what move a line (``common/limits.py``: whoever changes the head publishes it); this
    timer only covers a wake lost while the subscription reconnected, or a head whose worker died
    (the next job notices within ``IDLE_RECHECK_S``). It grows with the rank — ``IDLE_RECHECK_S`` per
    10 places, at most ``MAX_RECHECK_S`` — so 5,000 waiting jobs cost Redis ~100 checks a second, not
    1,000; a ±20 % jitter keeps jobs that joined together from re-checking together."""
    base = min(MAX_RECHECK_S, IDLE_RECHECK_S * (1 + rank // 10))
    return base * random.uniform(0.8, 1.2)


def scopes_for(registry: Registry, model: Model, provider: Provider, key: str,
               own: Limits | None = None) -> list[Scope]:
    """The limits one call counts against: its provider's, its model's, its API key's own (``own``,
    carried by the job's spec from the admin API, else the registry's ``key_limits``)."""
    scopes = []
    if provider.limits.any:
        scopes.append(Scope(provider.name, provider.limits))
    if model.limits.any:
        scopes.append(Scope.of_model(provider.name, model.alias, model.limits))
    key_limits = own or registry.limits_of_key(key)
    if key_limits.any:
        scopes.append(Scope.of_key(key, key_limits))
    return scopes


@dataclass
class Permit:
    """The permits one upstream call holds; give them back with :meth:`AdmissionControl.release`."""

    provider: str
    scopes: list[Scope]
    call_id: str
    tokens: int
    released: bool = field(default=False)


class StopAdmitting(Exception):  # noqa: N818 - a signal to the task, not an error
    """This worker process is stopping: the job was not started (it left its line, if it stood in
    one) and its message goes back to the queue for another worker or the next start."""


class AdmissionControl:
    def __init__(self, limiter: Limiter, call_lease_s: float) -> None:
        self.limiter = limiter
        self.call_lease_s = call_lease_s
        self.stopping = False
        self.proc_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._waiters: dict[str, threading.Event] = {}
        self._started = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start this process's heartbeat (``P:lim:proc:<proc_id>``) and wake listener now, not at the
        first wait in line: every job this process holds names it (the job's ``holder``)."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._started.is_set():
            return
        with self._lock:
            if not self._started.is_set():
                self.limiter.heartbeat(self.proc_id, PROC_TTL_S)
                threading.Thread(target=self._heartbeat, name="admission-heartbeat", daemon=True).start()
                threading.Thread(target=self._listen, name="admission-wake", daemon=True).start()
                self._started.set()

    def stop_admitting(self) -> int:
        """The process is stopping: every job waiting in line here leaves it and raises
        :class:`StopAdmitting` (jobs already running after an upstream 429 keep their place); returns
        how many were waiting."""
        self.stopping = True
        waiting = list(self._waiters.values())
        for wake in waiting:
            wake.set()
        return len(waiting)

    def wait_for_turn(self, *, job_id: str, provider: str, scopes: list[Scope], tokens: int, key: str,
                      weight: float, deadline: float, execution: str, job_lease_s: float,
                      rewait: bool = False) -> tuple[Attempt, Permit | None]:
        """Block until the job may start (``run``, with a :class:`Permit`) or must not (``expired``,
        ``gone``, ``too_large``). In ``rewait`` mode (after an upstream 429) the job is already running
        and waits at the head of the line; past ``deadline`` it gives up with ``expired``. Raises
        :class:`StopAdmitting` (out of the line) once :meth:`stop_admitting` was called, unless ``rewait``."""
        self._ensure_started()
        wake = threading.Event()
        self._waiters[job_id] = wake
        try:
            while True:
                if self.stopping and not rewait:
                    self.limiter.leave(provider, job_id)
                    raise StopAdmitting(f"job {job_id} left the line: this worker is stopping")
                call_id = f"{job_id}:{secrets.token_hex(4)}"
                attempt = self.limiter.acquire(
                    provider=provider, scopes=scopes, job_id=job_id, execution=execution,
                    job_lease_s=job_lease_s, call_id=call_id, call_lease_s=self.call_lease_s, tokens=tokens,
                    key=key, weight=weight, proc_id=self.proc_id, rewait=rewait)
                if attempt.outcome is Start.RUN:
                    return attempt, Permit(provider, scopes, call_id, tokens)
                if attempt.outcome is not Start.WAIT:
                    return attempt, None
                remaining = deadline - time.time()
                if rewait and remaining <= 0:
                    self.limiter.leave(provider, job_id)
                    return Attempt(Start.EXPIRED), None
                timeout = recheck_after(attempt.rank)
                if attempt.wait_ms:  # the head, told when a permit frees
                    timeout = min(timeout, attempt.wait_ms / 1000)
                # wake at the deadline too: the next acquire then expires the job (queued) atomically
                wake.wait(max(0.0, min(timeout, remaining + 0.01)))
                wake.clear()
        finally:
            self._waiters.pop(job_id, None)

    def release(self, permit: Permit, actual_tokens: int | None, *, refund: bool = False) -> None:
        if permit.released:
            return
        permit.released = True
        self.limiter.release(provider=permit.provider, scopes=permit.scopes, call_id=permit.call_id,
                             tokens=permit.tokens, actual_tokens=actual_tokens, refund=refund)

    def renew(self, permit: Permit) -> None:
        if not permit.released:
            self.limiter.renew(permit.scopes, permit.call_id, self.call_lease_s)

    def _heartbeat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                self.limiter.heartbeat(self.proc_id, PROC_TTL_S)
            except redis.RedisError as exc:
                log.warning("admission heartbeat failed: %s", exc)

    def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.limiter.redis.pubsub()
            try:
                pubsub.subscribe(self.limiter.wake_channel)
                for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        backoff = 0.1
                        for waiter in list(self._waiters.values()):  # we may have missed a wake
                            waiter.set()
                    elif message["type"] == "message":
                        found = self._waiters.get(message["data"].decode())
                        if found is not None:
                            found.set()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("wake subscription lost (%s); reconnecting", exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()
