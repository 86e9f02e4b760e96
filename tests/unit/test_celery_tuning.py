"""When the worker batches its task events (``workers/celery_tuning.py``): only on a green pool without
Celery's own event loop, only with events on — and installing twice adds the step once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.events.dispatcher import EventDispatcher

from workers.celery_tuning import BatchedTaskEvents, install


def dispatcher(app: Celery) -> EventDispatcher:
    return EventDispatcher(connection=app.connection_for_write(), enabled=False, app=app)


@pytest.mark.parametrize(("events", "hub", "green", "batched"), [
    (True, None, True, True),        # the gevent worker: Celery would send each event at once
    (True, object(), False, False),  # prefork: Celery buffers itself, flushed by its hub
    (True, None, False, False),      # solo / threads: no greenlet to flush from
    (False, None, True, False),      # no dispatcher at all
], ids=["gevent", "prefork-hub", "solo", "no-dispatcher"])
def test_task_events_are_batched_only_on_a_green_pool_without_a_hub(events: bool, hub: Any, green: bool,
                                                                    batched: bool) -> None:
    app = Celery("t", broker="redis://127.0.0.1:1/0", set_as_current=False)
    consumer = SimpleNamespace(event_dispatcher=dispatcher(app) if events else None, hub=hub,
                               pool=SimpleNamespace(is_green=green))
    step = BatchedTaskEvents(consumer)
    step.start(consumer)
    assert (step.flusher is not None) is batched
    if consumer.event_dispatcher is not None:
        assert set(consumer.event_dispatcher.buffer_group) == ({"task"} if batched else set())


def test_install_adds_the_step_once() -> None:
    app = Celery("t", set_as_current=False)
    install(app)
    install(app)
    assert [step for step in app.steps["consumer"] if step is BatchedTaskEvents] == [BatchedTaskEvents]
