"""The deadline watchdog's bookkeeping (no I/O: clocks without a connection to cut)."""

from __future__ import annotations

import time

import pytest

from common.registry import Provider
from workers.adapters._deadline import CallClock, Watchdog


class NoConnection:
    connection = None  # a response whose body was read to its end


def wait_for(predicate, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.005)
    return time.monotonic() - started


# id, provider deadlines, streamed, events to send, what expires and when (s after the start)
EXPIRIES = [
    ("whole-answer", {"timeout": 0.2}, False, 0, "whole answer within 0.2s", 0.2),
    ("first-event", {"timeout": 5, "first_byte_timeout": 0.2}, True, 0,
     "first stream event within 0.2s", 0.2),
    ("idle-shorter-than-first-event", {"timeout": 5, "first_byte_timeout": 3, "idle_timeout": 0.2}, True, 1,
     "next stream event within 0.2s", 0.2),
    ("stream-cap", {"timeout": 5, "stream_timeout": 0.3, "idle_timeout": 1}, True, 1,
     "whole stream within 0.3s", 0.3),
]


@pytest.mark.parametrize(("fields", "stream", "events", "missed", "after"), [e[1:] for e in EXPIRIES],
                         ids=[e[0] for e in EXPIRIES])
def test_a_clock_expires_at_its_nearest_deadline(fields, stream, events, missed, after):
    clock = CallClock("up", Provider(kind="openai", **fields).deadlines, stream=stream, watchdog=Watchdog())
    clock.watch(NoConnection())  # type: ignore[arg-type]
    for _ in range(events):
        clock.progress()
    elapsed = wait_for(lambda: clock.expired is not None, after + 1.0)
    assert clock.expired.startswith(f"its {missed}") and after - 0.05 <= elapsed < after + 0.25
    clock.stop()


def test_progress_keeps_a_stream_alive():
    clock = CallClock("up", Provider(kind="openai", timeout=5, idle_timeout=0.15).deadlines, stream=True,
                      watchdog=Watchdog())
    clock.watch(NoConnection())  # type: ignore[arg-type]
    until = time.monotonic() + 0.6  # four idle limits long, an event every 0.03 s
    while time.monotonic() < until:
        clock.progress()
        assert clock.expired is None
        time.sleep(0.03)
    clock.stop()


def test_stopped_clocks_do_not_pile_up():
    watchdog = Watchdog()
    deadlines = Provider(kind="openai", timeout=600).deadlines
    for _ in range(5000):
        clock = CallClock("up", deadlines, stream=True, watchdog=watchdog)
        clock.watch(NoConnection())  # type: ignore[arg-type]
        clock.progress()
        clock.stop()
    assert len(watchdog._heap) <= 1024 + 1
