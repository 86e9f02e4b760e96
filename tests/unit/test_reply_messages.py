"""The reply channel's messages (common/jobs.py ``parse_reply``): one event (emit.lua) or a stream's
batch (emit_chunks.lua), decoded in the order they were appended; anything else refused."""

from __future__ import annotations

import pytest

from common.contract import Chunk, Done, JobEvent
from common.jobs import StreamEvent, parse_reply


def chunk(text: str) -> Chunk:
    return Chunk({"choices": [{"index": 0, "delta": {"content": text}}]})


def message(job_id: str, *entries: tuple[str, JobEvent]) -> bytes:
    """As the scripts build it: the job id, then a stream id line and an event line per event."""
    return "\n".join([job_id, *(f"{sid}\n{event.to_json()}" for sid, event in entries)]).encode()


CASES = [
    ("one-event", [("1-0", Done({"provider": "fake"}))]),
    ("a-batch-in-order", [("1-0", chunk("a")), ("1-1", chunk("b")), ("2-0", chunk("c"))]),
    ("text-with-newlines-and-unicode", [("5-0", chunk("line 1\nline 2 — é\r\n")), ("5-1", chunk("\n"))]),
]


@pytest.mark.parametrize("entries", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_a_message_decodes_to_its_events_in_order(entries):
    job_id, events = parse_reply(message("job_1", *entries))
    assert job_id == "job_1"
    assert events == [StreamEvent(sid, event) for sid, event in entries]


@pytest.mark.parametrize("raw", [b"job_1", b"job_1\n1-0", b"job_1\n1-0\n{}\n2-0"],
                         ids=["no-event", "id-without-event", "dangling-id"])
def test_a_message_that_is_not_id_event_pairs_is_refused(raw):
    with pytest.raises(ValueError):
        parse_reply(raw)
