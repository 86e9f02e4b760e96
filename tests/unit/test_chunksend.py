"""The stream relay's chunk sender (workers/chunksend.py): order kept, coalescing only while a send is
in flight, a failed send raised to the reader."""

from __future__ import annotations

import threading

import pytest

from common.contract import Chunk
from workers.chunksend import ChunkSender


def chunk(i: int) -> Chunk:
    return Chunk({"choices": [{"delta": {"content": f"w{i}"}}]})


@pytest.mark.parametrize("n", [1, 2, 25], ids=["one", "two", "a-stream"])
def test_every_chunk_goes_out_once_in_order(n):
    batches: list[list[Chunk]] = []
    sender = ChunkSender(lambda batch: batches.append(list(batch)))
    for i in range(n):
        sender.put(chunk(i))
    sender.close()
    assert [c for b in batches for c in b] == [chunk(i) for i in range(n)]


def test_the_first_chunk_goes_alone_and_those_put_during_its_send_go_together():
    release = threading.Event()
    started = threading.Event()
    batches: list[list[Chunk]] = []

    def send(batch):
        batches.append(list(batch))
        started.set()
        release.wait(5)  # the first send is slow: the reader goes on meanwhile

    sender = ChunkSender(send)
    sender.put(chunk(0))
    assert started.wait(5)
    for i in range(1, 4):
        sender.put(chunk(i))
    release.set()
    sender.close()
    assert batches == [[chunk(0)], [chunk(1), chunk(2), chunk(3)]]


@pytest.mark.parametrize("where", ["put", "close"], ids=["next-put", "close"])
def test_a_failed_send_is_raised_to_the_reader(where):
    failed = threading.Event()

    def send(batch):
        failed.set()
        raise ConnectionError("redis went away")

    sender = ChunkSender(send)
    sender.put(chunk(0))
    assert failed.wait(5)
    with pytest.raises(ConnectionError):
        if where == "put":
            for _ in range(100):  # the error is recorded just after send raised
                sender.put(chunk(1))
                threading.Event().wait(0.01)
        else:
            sender.close()


def test_an_urgent_put_waits_until_the_sender_took_it():
    """The reader's put of the first token returns only once that chunk is on its way: with a send in
    flight it waits for that send to end and the next (its own) to begin."""
    release = threading.Event()
    first_in_flight = threading.Event()
    batches: list[list[Chunk]] = []

    def send(batch):
        batches.append(list(batch))
        if len(batches) == 1:
            first_in_flight.set()
            release.wait(5)

    sender = ChunkSender(send)
    sender.put(chunk(0))
    assert first_in_flight.wait(5)    # the sender took chunk 0 (else both would go in one batch)
    threading.Timer(0.05, release.set).start()
    sender.put(chunk(1), urgent=True)
    assert release.is_set()           # it waited for the first send to end
    sender.close()
    assert batches == [[chunk(0)], [chunk(1)]]

