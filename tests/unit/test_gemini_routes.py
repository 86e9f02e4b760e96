"""The Gemini ingress's stream framing: SSE events, or one JSON array that stays valid JSON with its
keep-alives and an error at the end."""

import json

import pytest

from api.gemini_routes import GeminiJsonArray, GeminiSse
from common.errors import QueueTimeout, UpstreamUnavailable


def chunk(delta, finish_reason=None):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


TEXT = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({}, "stop")]


def play(fmt, chunks, *, wait_first=0, error=None):
    """Everything the format writes for a job that waits ``wait_first`` pings, then streams ``chunks``
    and ends with ``done`` (or ``error``)."""
    out = [piece for _ in range(wait_first) for piece in fmt.waiting(3)]
    out += [piece for c in chunks for piece in fmt.chunk(c)]
    out += fmt.error(error) if error else fmt.done({})
    return "".join(out)


def sse_events(text):
    """The events as an SSE reader sees them: each ``data:`` line ends an event with a blank line."""
    lines = text.split("\r\n")
    assert "\n" not in "".join(lines) and all(not line or line.startswith("data: ") for line in lines)
    data = [i for i, line in enumerate(lines) if line]
    assert all(lines[i + 1] == "" for i in data)
    return [json.loads(lines[i].removeprefix("data: ")) for i in data]


def texts(responses):
    return ["".join(p.get("text", "") for p in r["candidates"][0]["content"]["parts"]) for r in responses
            if "candidates" in r]


STREAMS = [
    ("text", TEXT, 0, None),
    ("waited-in-line", TEXT, 2, None),
    ("error-after-text", TEXT[:2], 0, UpstreamUnavailable("upstream broke")),
    ("error-before-anything", [], 1, QueueTimeout("waited too long")),
]


@pytest.mark.parametrize("chunks,waits,error", [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS])
def test_json_array_and_sse_carry_the_same_responses(chunks, waits, error):
    array = json.loads(play(GeminiJsonArray("m"), chunks, wait_first=waits, error=error))
    events = sse_events(play(GeminiSse("m"), chunks, wait_first=waits, error=error))
    assert isinstance(array, list) and array == events
    if error:
        assert array[-1] == {"error": {"code": error.status, "message": error.message,
                                       "status": {429: "RESOURCE_EXHAUSTED", 502: "INTERNAL"}[error.status]}}
    else:
        assert texts(array) == ["Hel", "lo", ""] and array[-1]["candidates"][0]["finishReason"] == "STOP"
        assert array[-1]["usageMetadata"]["totalTokenCount"] == 0


def test_keep_alives_are_blank_lines_only():
    """The google-genai SDK parses every non-blank line that is not ``data:`` as JSON."""
    assert GeminiSse("m").waiting(None) == GeminiJsonArray("m").waiting(4) == ["\r\n"]


def test_json_array_media_types():
    assert (GeminiSse.mimetype, GeminiJsonArray.mimetype) == ("text/event-stream", "application/json")
