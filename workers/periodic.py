"""A worker process's housekeeping threads: each calls its :meth:`Periodic.tick` on an interval."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Periodic:
    """A daemon thread that calls :meth:`tick` every ``interval`` seconds until :meth:`stop`. A failure
    of a kind in ``retry_on`` (a broker or database hiccup) is logged and the next tick tries again."""

    name = "periodic"
    retry_on: tuple[type[BaseException], ...] = (OSError,)
    #: tick once as soon as the thread starts, not only after the first interval
    tick_at_start = False

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> object:
        raise NotImplementedError

    def _run(self) -> None:
        if self.tick_at_start:
            self._tick()
        while not self._stop.wait(self.interval):
            self._tick()

    def _tick(self) -> None:
        try:
            self.tick()
        except self.retry_on as exc:
            log.warning("%s failed (%s); retrying in %.0fs", self.name, exc, self.interval)
