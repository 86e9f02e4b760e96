"""One Redis subscription per API process delivers every job event to the request waiting for it.

Workers publish each event of a job to the channel of the API process that submitted it
(``reply_to``); a stream's chunks come several to a message when they were sent together. This
process keeps one pubsub connection on its channel and hands each event to the waiting request's
in-memory queue — so 5,000 held requests cost one Redis connection and no
polling. If the subscription breaks, every waiter is told to re-read its job's stream (events are
also kept there), so nothing published during the gap is lost.

The channel also names the process to the workers: its heartbeat ``<channel>:alive`` (TTL
``ALIVE_TTL_S``, renewed every ``ALIVE_EVERY_S``) says somebody still waits for the answers of the
sync jobs it queued. A worker never starts a sync job whose API process's heartbeat is gone
(``common/lua/job.lua``): its caller was disconnected with it.

With a :class:`~api.redeliver.SyncRedelivery` it also looks after the jobs it holds: one whose queue
message a dying worker took along is queued again (``api/redeliver.py``).
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time

import redis

from api.redeliver import SyncRedelivery
from common.jobs import CALLER_ALIVE_TTL_S, JobStore, StreamEvent, parse_reply

log = logging.getLogger(__name__)

ALIVE_TTL_S = CALLER_ALIVE_TTL_S  # a dead API process's queued sync jobs are cancelled, never run, after this
ALIVE_EVERY_S = 3.0


class Resync:
    """Put to every waiter when the subscription was (re-)established: re-read your job's stream."""


RESYNC = Resync()
Delivery = StreamEvent | Resync


class ReplyDispatcher:
    def __init__(self, store: JobStore, redelivery: SyncRedelivery | None = None) -> None:
        self.store = store
        self.redelivery = redelivery
        self.instance_id = secrets.token_hex(8)
        self.channel = store.reply_channel(self.instance_id)
        self.alive_key = store.alive_key(self.channel)
        self._beat_at = -math.inf
        self._waiters: dict[str, queue.SimpleQueue[Delivery]] = {}
        self._since: dict[str, float] = {}   # job id -> when it was registered (monotonic)
        self._subscribed = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure_started(self, timeout: float = 5.0) -> None:
        """Start the listener (once per process, after fork) and wait until it is subscribed."""
        if self._subscribed.is_set():
            return
        with self._start_lock:
            if self._thread is None:
                self._beat()  # before the first job is queued: a worker may look for it at once
                threading.Thread(target=self._heartbeat, name="reply-heartbeat", daemon=True).start()
                if self.redelivery is not None:
                    threading.Thread(target=self.redelivery.run, args=(self.held_before,),
                                     name="sync-redelivery", daemon=True).start()
                self._thread = threading.Thread(target=self._run, name="reply-dispatcher", daemon=True)
                self._thread.start()
        if not self._subscribed.wait(timeout):
            raise redis.ConnectionError("could not subscribe to the reply channel")

    def register(self, job_id: str) -> queue.SimpleQueue[Delivery]:
        self.ensure_started()
        if time.monotonic() - self._beat_at > ALIVE_EVERY_S:  # e.g. just after a Redis outage
            self._beat()
        waiter: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._waiters[job_id] = waiter
        self._since[job_id] = time.monotonic()
        return waiter

    def unregister(self, job_id: str) -> None:
        self._waiters.pop(job_id, None)
        self._since.pop(job_id, None)

    def held_before(self, moment: float) -> list[str]:
        """The jobs registered before ``moment`` (monotonic) whose callers still wait."""
        return [job_id for job_id, since in list(self._since.items()) if since < moment]

    def wake_all(self) -> None:
        """Every waiting watch looks at its job again now (e.g. its deadline moved: the process stops)."""
        for waiter in list(self._waiters.values()):
            waiter.put(RESYNC)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _beat(self) -> None:
        self.store.redis.set(self.alive_key, 1, px=int(ALIVE_TTL_S * 1000))
        self._beat_at = time.monotonic()

    def _heartbeat(self) -> None:
        while True:
            time.sleep(ALIVE_EVERY_S)
            try:
                self._beat()
            except (redis.RedisError, OSError) as exc:
                log.warning("API heartbeat failed (%s); retrying in %.0fs", exc, ALIVE_EVERY_S)

    def _deliver(self, data: bytes) -> None:
        """Hand a message's events (one, or a stream's batch: in order) to the job's waiter. A message
        that does not decode is not fatal to the subscription: its job's waiter re-reads the job's
        stream instead (its events are there), before any later message of that job."""
        try:
            job_id, events = parse_reply(data)
        except (ValueError, UnicodeDecodeError) as exc:
            log.error("undecodable reply message (%s): its job's stream is read instead", exc)
            found = self._waiters.get(data.split(b"\n", 1)[0].decode(errors="replace"))
            if found is not None:
                found.put(RESYNC)
            return
        found = self._waiters.get(job_id)
        if found is not None:
            for event in events:
                found.put(event)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                pubsub.subscribe(self.channel)
                for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        backoff = 0.1
                        self._subscribed.set()
                        for waiter in list(self._waiters.values()):
                            waiter.put(RESYNC)
                    elif message["type"] == "message":
                        self._deliver(message["data"])
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._subscribed.clear()
                log.warning("reply subscription lost (%s); reconnecting in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()
