"""Where a stopping worker may raise into Celery's consumer loop (``workers/shutdown.py``): only while
it waits in kombu's poll of the broker sockets — never while it reads a reply (a BRPOP reply dropped
half-read is a message lost)."""

from __future__ import annotations

import os
import sys
from types import FrameType

import pytest

from workers.shutdown import parked_waiting_for_broker

SITE = f"{os.sep}venv{os.sep}site-packages{os.sep}"


def stack(*calls: tuple[str, str]) -> FrameType:
    """A real frame whose callers are ``calls`` (outermost first), each function ``name`` compiled
    as if defined in the file at ``path`` under site-packages — the innermost frame is returned."""
    namespace: dict[str, object] = {}
    for depth, (path, name) in enumerate(calls):   # each function compiled under its own file name
        nxt = f"_f{depth + 1}()" if depth + 1 < len(calls) else "__import__('sys')._getframe()"
        code = compile(f"def {name}():\n    return {nxt}\n", SITE + path.replace("/", os.sep), "exec")
        exec(code, namespace)
        namespace[f"_f{depth}"] = namespace[name]
    frame = namespace["_f0"]()   # type: ignore[operator]
    assert isinstance(frame, FrameType)
    return frame


LOOP = ("celery/worker/loops.py", "synloop")
DRAIN = ("kombu/transport/virtual/base.py", "drain_events")
GET = ("kombu/transport/redis.py", "get")
HUB = ("gevent/hub.py", "switch")

CASES = {
    "waits in kombu's poll (gevent's wait below it)": ([LOOP, DRAIN, GET, ("kombu/utils/eventio.py", "poll"),
                                                        ("gevent/select.py", "poll"), HUB], True),
    "reads a BRPOP reply": ([LOOP, DRAIN, GET, ("kombu/transport/redis.py", "_brpop_read"),
                             ("redis/client.py", "parse_response"), HUB], False),
    "handles an event": ([LOOP, DRAIN, GET, ("kombu/transport/redis.py", "handle_event"), HUB], False),
    "runs a task, no kombu frame": ([("celery/app/trace.py", "trace_task"), HUB], False),
}


@pytest.mark.parametrize(("calls", "expected"), CASES.values(), ids=CASES.keys())
def test_parked_waiting_for_broker(calls: list[tuple[str, str]], expected: bool) -> None:
    assert parked_waiting_for_broker(stack(*calls)) is expected


def test_no_frame_is_not_parked() -> None:
    assert parked_waiting_for_broker(None) is False
    assert parked_waiting_for_broker(sys._getframe()) is False
