"""Two fixes to kombu's Redis transport. Importing this module changes nothing: :func:`install` applies
them, called once by the worker's start-up (``workers/worker.py``) before any broker channel exists.

**Lost messages.** kombu's synchronous pool is a plain ``redis.ConnectionPool`` of ``max_connections``
(10 by default) that *raises* ``MaxConnectionsError`` when every connection is busy. A gevent worker
holding thousands of jobs acks and delivers in bursts of more than that: acks failed ("Couldn't
ack"), and worse, a delivery whose bookkeeping write (``QoS.append``: the unacked index) failed after
its BRPOP had already taken the message from the queue lost that message for good — the job stayed
``queued`` and its caller waited out its max_wait (bench/held.py, 5,000 held). The pool is made a
``BlockingConnectionPool``: a greenlet that finds every connection busy waits for one.

**Wasted CPU.** kombu's ``Channel.conn_or_acquire`` builds a brand-new ``redis.Redis`` client for
every publish (``_create_client``), and redis-py's constructor fills a ~150-entry callback table each
time. With
task events on (Flower needs them) a worker publishes 2–3 events per job: py-spy put that constructor
at ~10 % of the worker's CPU (bench/profile.py). A ``redis.Redis`` is safe to share — each command
borrows a connection from the pool — so each channel keeps one synchronous client. The asynchronous
(BRPOP) client, which owns its connection, is still created as kombu does.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_PATCHED = "_gateway_reuses_clients"
POOL_WAIT_S = 30.0  # a greenlet waits this long for a broker connection before the operation fails


def install() -> None:
    """Patch kombu's Redis ``Channel`` (idempotent: a second call changes nothing)."""
    channel = kombu_redis.Channel
    if getattr(channel, _PATCHED, False):
        return
    create = channel._create_client
    get_pool = channel._get_pool

    def _get_pool(self: Any, asynchronous: bool = False) -> Any:
        pool = get_pool(self, asynchronous=asynchronous)  # kombu's, with everything it sets up
        if asynchronous:  # the event loop's BRPOP connection: kombu manages it itself
            return pool
        return redis.BlockingConnectionPool(max_connections=pool.max_connections, timeout=POOL_WAIT_S,
                                            connection_class=pool.connection_class, **pool.connection_kwargs)

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return create(self, asynchronous=True)
        client = self.__dict__.get("_gateway_sync_client")
        if client is None:
            client = self.__dict__["_gateway_sync_client"] = create(self, asynchronous=False)
        return client

    channel._create_client = _create_client  # type: ignore[method-assign]
    channel._get_pool = _get_pool  # type: ignore[method-assign]
    setattr(channel, _PATCHED, True)
