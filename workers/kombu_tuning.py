"""One measured fix to kombu's Redis transport, applied explicitly by the worker entry point.

kombu's ``Channel.conn_or_acquire`` builds a brand-new ``redis.Redis`` client for every publish
(``_create_client``), and redis-py's constructor fills a ~150-entry callback table each time. With
task events on (Flower needs them) a worker publishes 2–3 events per job: py-spy put that constructor
at ~10 % of the worker's CPU (bench/profile.py). A ``redis.Redis`` is safe to share — each command
borrows a connection from the pool — so each channel keeps one synchronous client. The asynchronous
(BRPOP) client, which owns its connection, is still created as kombu does.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

_PATCHED = "_gateway_reuses_clients"


def reuse_kombu_redis_clients() -> None:
    channel = kombu_redis.Channel
    if getattr(channel, _PATCHED, False):
        return
    create = channel._create_client

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return create(self, asynchronous=True)
        client = self.__dict__.get("_gateway_sync_client")
        if client is None:
            client = self.__dict__["_gateway_sync_client"] = create(self, asynchronous=False)
        return client

    channel._create_client = _create_client
    setattr(channel, _PATCHED, True)
