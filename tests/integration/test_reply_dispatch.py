"""The API process's reply dispatcher (api/dispatcher.py) with the real Redis: a stream's batch of
chunks, published as one message by ``emit_chunks.lua``, reaches the job's waiter as its events in
order; a message that does not decode makes the waiter re-read the job's stream, and the subscription
goes on delivering."""

from __future__ import annotations

import queue
import secrets
from collections.abc import Iterator

import pytest
import redis

from api.dispatcher import RESYNC, Delivery, ReplyDispatcher
from common.contract import Chunk, Done, JobSpec, JobState, Kind, Mode
from common.jobs import JobStore, StreamEvent
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.integration

SPEC = JobSpec(Mode.SYNC, Kind.CHAT, "m", "p", {})


@pytest.fixture
def store() -> Iterator[JobStore]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    prefix = "gwreply-" + secrets.token_hex(4)
    yield JobStore(client, prefix)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def events(waiter: queue.SimpleQueue[Delivery], n: int) -> list[StreamEvent]:
    """The next ``n`` events (a RESYNC the subscription may send as it starts is skipped)."""
    out: list[StreamEvent] = []
    while len(out) < n:
        delivery = waiter.get(timeout=5)
        if isinstance(delivery, StreamEvent):
            out.append(delivery)
    return out


def test_a_batch_reaches_the_waiter_in_order_and_a_bad_message_means_reread(store):
    dispatcher = ReplyDispatcher(store)
    waiter = dispatcher.register("job_b")
    store.create("job_b", SPEC, max_wait=30, reply_to=dispatcher.channel, ttl=60)
    assert store.claim("job_b", "exec", 10).outcome.value == "run"
    chunks = [Chunk({"choices": [{"delta": {"content": f"w{i}"}}]}) for i in range(6)]

    store.emit_chunks("job_b", chunks[:1])
    store.emit_chunks("job_b", chunks[1:])
    got = events(waiter, 6)
    assert [e.event for e in got] == chunks
    assert got == store.read_events("job_b")  # the same stream ids: a re-read dedupes them

    store.redis.publish(dispatcher.channel, b"job_b\n1-0\n{not json")
    assert waiter.get(timeout=5) is RESYNC
    store.emit("job_b", Done({}), final_state=JobState.SUCCEEDED, execution="exec")
    assert [e.event for e in events(waiter, 1)] == [Done({})]
    dispatcher.unregister("job_b")
