"""Putting back messages whose worker died, on a timer that green pools lack.

With ``acks_late`` a message a worker took but never acked sits in kombu's ``unacked`` hash; kombu
moves it back to its queue once it is older than the visibility timeout — but only from its event
loop (prefork). Under the gevent/eventlet pools Celery runs its blocking ``synloop``, where kombu's
sweep never fires: every BRPOP reply (even the empty one each second) returns from the poll before
the sweep is reached (kombu.transport.redis ``MultiChannelPoller.get``). A SIGKILLed worker's job
would then wait forever. So each worker process runs this sweeper, which calls kombu's own
``restore_visible`` (mutex-guarded, transactional) on an interval.
"""

from __future__ import annotations

from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from workers.periodic import Periodic


class RedeliverySweeper(Periodic):
    name = "redelivery-sweep"
    retry_on = (OperationalError, RedisError, OSError)

    def __init__(self, app: Celery, interval: float) -> None:
        super().__init__(interval)
        self.app = app

    def tick(self) -> None:
        with self.app.connection_for_read() as connection:
            channel = connection.default_channel
            channel.qos.restore_visible(num=channel.unacked_restore_limit or 100, interval=1)
