"""A worker's graceful stop (SIGTERM, Ctrl-C): nothing lost, nothing run twice, bounded in time.

Celery's warm shutdown stops taking messages and waits for every task it started — without a bound,
and a job waiting in a provider's line is a started task, so a worker with a line never stopped on
its own. :class:`GracefulStop` begins when Celery does (``worker_shutting_down``) and

1. **stops admitting**: every job waiting in this process's lines leaves them, and a job delivered
   but not started is not started (:class:`~workers.admission.StopAdmitting`); once Celery stopped
   consuming (:func:`wait_until_not_consuming`), its task rejects its message with requeue, so it goes
   back on its queue — another worker serves it, or the next start;
2. **drains**: calls already at the upstream run on and settle as usual, for up to
   ``GATEWAY_DRAIN_TIMEOUT`` seconds (8 by default);
3. past that bound, **lets go** of the calls still running: their leases and this process's
   heartbeat are dropped, so any live worker's lease sweeper (``workers/leases.py``) puts their
   messages back within a sweep, and the process exits — as it does ``EXIT_GRACE_S`` after the drain
   time if Celery's own shutdown has not ended by then (whatever it had not acked, the sweepers put
   back: a settled job's message is dropped, an unstarted one served). Each job let go runs again as
   its next attempt (the lost one is recorded, ``attempt_lost``) — or is cancelled if its caller has
   already gone.

A cold shutdown (SIGQUIT, a second Ctrl-C) skips all this: kombu puts back the unacked messages
and the lease rules apply as after a crash.

Under the gevent pool Celery's signal handlers run in a callback of gevent's hub, where nothing may
block (``BlockingSwitchOutError``): :func:`outside_the_hub` runs the stop's start in a greenlet of its
own, and :func:`wake_consumer` makes Celery's consumer loop notice the stop at once — its loop checks
for one only between two-second waits for the broker, and once more after it saw it, so an idle worker
took ~6 s to stop.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from redis.exceptions import RedisError

from workers.runner import JobRunner

log = logging.getLogger(__name__)


EXIT_GRACE_S = 2.0   # past the drain time, a worker with nothing left to run exits within this


def wait_until_not_consuming(consumer: Any, timeout: float) -> None:
    """Block until Celery's warm shutdown has stopped the worker's consumer (its blueprint, which
    cancels the task consumer), at most ``timeout``: a message put back before that could be taken
    again by this very worker — and put back again, round and round until it stops consuming. (The
    consumer notices the stop at its next wait for the broker: :func:`wake_consumer`.)"""
    blueprint = getattr(consumer, "blueprint", None)
    if blueprint is not None:
        blueprint.shutdown_complete.wait(timeout)


WAKE_TRIES_S = 5.0   # past this, Celery's loop has noticed the stop by itself (two 2 s broker waits)


def _in_gevent_hub() -> bool:
    gevent = sys.modules.get("gevent")
    return gevent is not None and isinstance(gevent.getcurrent(), gevent.hub.Hub)


def outside_the_hub(fn: Callable[[], object]) -> None:
    """Run ``fn`` now, or — called from a callback of gevent's hub (a signal handler under the gevent
    pool), where blocking raises ``BlockingSwitchOutError`` — in a greenlet of its own, next."""
    if _in_gevent_hub():
        sys.modules["gevent"].spawn(fn)
    else:
        fn()


def parked_waiting_for_broker(frame: FrameType | None) -> bool:
    """Whether a greenlet suspended at ``frame`` waits in kombu's poll of its broker sockets (the BRPOP
    sent, its reply not being read): an exception thrown there leaves nothing half-read — the channel's
    close reads that reply, and a message in it goes back on its queue (kombu: no consumer left)."""
    while frame is not None:
        code = frame.f_code
        if f"{os.sep}kombu{os.sep}" in code.co_filename:   # the innermost kombu frame decides
            return code.co_name == "poll" and code.co_filename.endswith("eventio.py")
        frame = frame.f_back
    return False


def _runs(frame: FrameType | None, path_end: str, name: str) -> bool:
    while frame is not None:
        if frame.f_code.co_name == name and frame.f_code.co_filename.endswith(path_end):
            return True
        frame = frame.f_back
    return False


def pidbox_greenlet() -> Any:
    """The greenlet of Celery's remote-control (pidbox) loop under gevent (a raw greenlet Celery keeps
    no handle on: found among the live objects, once, at the stop), or None. Celery's stop waits for
    it, and it sees the stop only between one-second broker waits."""
    from greenlet import greenlet

    for obj in gc.get_objects():
        if isinstance(obj, greenlet) and _runs(obj.gr_frame, os.path.join("celery", "worker", "pidbox.py"),
                                                "loop"):
            return obj
    return None


def wake_consumer(loop: Any) -> None:
    """Make Celery's consumer loop (the greenlet ``loop``, parked in its broker wait) stop now rather
    than after up to two more two-second waits: from the hub, at a moment it waits for the broker,
    raise in it — once — what its next check of the worker's state would (``WorkerShutdown`` /
    ``WorkerTerminate``); then end the current one-second wait of the ``pidbox`` loop (a timeout it
    expects), which Celery's stop waits for. Tried every 20 ms for ``WAKE_TRIES_S``; never while a
    reply is being read. A no-op outside gevent."""
    gevent = sys.modules.get("gevent")
    if gevent is None or loop is None:
        return
    from celery.worker import state
    woken: list[Any] = []
    pidbox: Any = None

    def throw_if_parked() -> None:
        target = pidbox if woken else loop
        if target is None or target.dead or not parked_waiting_for_broker(target.gr_frame):
            return
        if woken:   # its loop catches the timeout and, the stop flagged by now, ends
            target.throw(TimeoutError())
            return
        try:
            state.maybe_shutdown()
        except SystemExit as exc:   # the stop Celery has flagged, raised where its loop would
            woken.append(exc)
            target.throw(exc)

    def keep_trying() -> None:
        nonlocal pidbox
        pidbox = pidbox_greenlet()
        hub, deadline = gevent.get_hub(), time.monotonic() + WAKE_TRIES_S
        while time.monotonic() < deadline and not (woken and (pidbox is None or pidbox.dead)):
            hub.loop.run_callback(throw_if_parked)   # check and throw with no switch in between
            gevent.sleep(0.02)

    gevent.spawn(keep_trying)


class GracefulStop:
    def __init__(self, runner: JobRunner, drain_s: float) -> None:
        self.runner = runner
        self.drain_s = drain_s
        self._begun = False

    def begin(self) -> None:
        """Stop admitting now and let go of what still runs ``drain_s`` from now (returns at once:
        Celery calls it from its signal handler)."""
        if self._begun:
            return
        self._begun = True
        waiting = self.runner.admission.stop_admitting()
        log.warning("stopping: %d job(s) waiting in line go back on the queue; %d call(s) running get "
                    "up to %gs to finish (GATEWAY_DRAIN_TIMEOUT)", waiting, len(self.runner.running),
                    self.drain_s)
        threading.Thread(target=self._let_go_after, name="drain-deadline", daemon=True).start()

    def _let_go_after(self) -> None:
        deadline = time.monotonic() + self.drain_s
        while self.runner.running and time.monotonic() < deadline:
            time.sleep(0.1)
        running = dict(self.runner.running)
        if running:
            log.warning("stopped after the %gs drain time with %d call(s) still running: they will run "
                        "again on another worker (or at the next start) as their next attempt",
                        self.drain_s, len(running))
        else:
            # nothing runs: Celery's warm shutdown ends by itself — but not later than this
            time.sleep(max(0.0, deadline - time.monotonic()) + EXIT_GRACE_S)
            log.warning("still stopping %gs after the drain time; exiting", EXIT_GRACE_S)
        self.let_go(running)
        logging.shutdown()
        os._exit(0)

    def let_go(self, running: dict[str, str]) -> None:
        """Drop the leases of ``running`` (job id → execution) and this process's heartbeat, so the
        lease sweeper of any live worker treats their deliveries as a dead worker's at its next sweep."""
        store, admission = self.runner.store, self.runner.admission
        try:
            pipe = store.redis.pipeline()
            for job_id, execution in running.items():
                if store.redis.get(store.lease_key(job_id)) == execution.encode():
                    pipe.delete(store.lease_key(job_id))
            pipe.delete(admission.limiter.proc_key(admission.proc_id))
            pipe.execute()
        except RedisError as exc:  # the leases lapse by themselves within their TTL
            log.warning("could not drop the running calls' leases (%s); they lapse within %gs", exc,
                        self.runner.lease_ttl)
