"""An idle worker stops promptly, however it is told to, and says nothing alarming doing so.

Under the gevent pool Celery runs its signal handlers in a callback of gevent's hub, where nothing may
block: the graceful stop's start raised ``BlockingSwitchOutError`` there, and Celery's consumer loop
only noticed a stop after up to two more two-second broker waits — every stop took ~6 s, paid by every
test that stops a worker and by every operator's ``docker stop`` (``workers/shutdown.py``). The
guarantees of a stop with work in hand are tested in ``test_graceful_stop.py`` and ``test_crashes.py``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.conftest import WorkerFactory

pytestmark = pytest.mark.integration

PROMPT_S = 4.0   # an idle worker's stop, exit included: 1.4–2.5 s on a quiet machine (5.5–6.6 s before)

STOPS = {
    "cold": [signal.SIGQUIT],
    "warm": [signal.SIGTERM],
    "ctrl-c": [signal.SIGINT],
    "cold-then-warm": [signal.SIGQUIT, signal.SIGTERM],   # what the tests' stop_all sends
}


@pytest.mark.parametrize("signals", STOPS.values(), ids=STOPS.keys())
def test_an_idle_worker_stops_promptly_and_cleanly(worker_factory: WorkerFactory,
                                                   signals: list[signal.Signals]) -> None:
    proc = worker_factory.start("fake", "idle-" + "-".join(s.name for s in signals))
    started = time.monotonic()
    for sig in signals:
        os.killpg(proc.proc.pid, sig)
    proc.proc.wait(timeout=15)
    exited_s = time.monotonic() - started
    out = proc.output()
    assert "Traceback" not in out and "Error" not in out.split("ready.")[-1], out[-4000:]
    assert exited_s < PROMPT_S, (exited_s, out[-4000:])
    assert ("still stopping" in out) is False   # Celery's own stop ended it, not the drain's backstop
