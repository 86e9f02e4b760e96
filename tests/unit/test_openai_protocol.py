"""Validation of OpenAI chat bodies: every bad input becomes an InvalidRequest naming its parameter."""

import json

import pytest

from api.openai_routes import OpenAIStream
from common.errors import InvalidRequest
from common.protocols.openai import parse_chat_request

USER = [{"role": "user", "content": "hi"}]

VALID = [
    ("minimal", {"model": "m", "messages": USER}, {"model": "p", "messages": USER}),
    ("passthrough-unknown-params", {"model": "m", "messages": USER, "seed": 7, "logprobs": True},
     {"model": "p", "messages": USER, "seed": 7, "logprobs": True}),
    ("gateway-extension-stripped", {"model": "m", "messages": USER, "max_wait": 5},
     {"model": "p", "messages": USER}),
    ("content-parts",
     {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
     {"model": "p", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("tool-round-trip", {"model": "m", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]},
     {"model": "p", "messages": [
         {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                               "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "42"}]}),
    ("sampling",
     {"model": "m", "messages": USER, "temperature": 0.2, "top_p": 1, "max_tokens": 10, "stop": ["x"]},
     {"model": "p", "messages": USER, "temperature": 0.2, "top_p": 1, "max_tokens": 10, "stop": ["x"]}),
]


@pytest.mark.parametrize("body,upstream", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_bodies_become_the_upstream_body(body, upstream):
    request, _ = parse_chat_request(body)
    assert request.upstream_body("p") == upstream


def test_extensions_are_returned_separately():
    _, extensions = parse_chat_request({"model": "m", "messages": USER, "max_wait": 2.5})
    assert extensions == {"max_wait": 2.5}


INVALID = [
    ("not-an-object", [1, 2], None, "JSON object"),
    ("missing-model", {"messages": USER}, "model", "missing required parameter: 'model'"),
    ("empty-model", {"model": "", "messages": USER}, "model", "invalid value"),
    ("missing-messages", {"model": "m"}, "messages", "missing required parameter: 'messages'"),
    ("messages-not-list", {"model": "m", "messages": "hi"}, "messages", "invalid value"),
    ("empty-messages", {"model": "m", "messages": []}, "messages", "at least 1"),
    ("unknown-role", {"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role",
     "invalid value"),
    ("temperature-too-high", {"model": "m", "messages": USER, "temperature": 3}, "temperature",
     "less than or equal"),
    ("max-tokens-zero", {"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens",
     "greater than or equal"),
    ("stream-not-bool", {"model": "m", "messages": USER, "stream": "yes please"}, "stream", "invalid value"),
    ("tools-not-list", {"model": "m", "messages": USER, "tools": {"a": 1}}, "tools", "invalid value"),
]


@pytest.mark.parametrize("body,param,fragment", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_bodies_name_the_problem(body, param, fragment):
    with pytest.raises(InvalidRequest) as err:
        parse_chat_request(body)
    assert err.value.status == 400
    assert err.value.param == param
    assert fragment in err.value.message


_FRAME = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
_TEXT = {**_FRAME, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
_STOP = {**_FRAME, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
_USAGE = {**_FRAME, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
_EMPTY = {**_FRAME, "choices": [{"index": 0, "delta": {}, "finish_reason": None}]}


@pytest.mark.parametrize(("include_usage", "chunks", "out"), [
    (False, [_TEXT, _STOP, _USAGE], [_TEXT, _STOP]),
    (True, [_TEXT, _STOP, _USAGE], [_TEXT, _STOP, _USAGE]),
    (True, [_TEXT, _STOP], [_TEXT, _STOP]),
    (False, [_TEXT], [_TEXT, _EMPTY]),
    (True, [_TEXT], [_TEXT, {**_FRAME, "choices": [], "usage": None}]),
    (False, [_STOP, _TEXT, _STOP], [_STOP, _TEXT, _STOP]),
], ids=["finish-chunk-carries-it", "usage-chunk-carries-it", "no-usage-from-upstream", "no-finish-reason",
        "neither", "a-later-chunk-releases-a-held-one"])
def test_an_openai_stream_ends_with_the_gateway_object(include_usage, chunks, out):
    fmt = OpenAIStream(include_usage)
    frames = [frame for chunk in chunks for frame in fmt.chunk(chunk)]
    frames += fmt.done({"job_id": "job_1", "deployment": "p/m"})
    assert frames[-1] == "data: [DONE]\n\n"
    sent = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]
    assert sent == out[:-1] + [{**out[-1], "x-gateway": {"job_id": "job_1", "deployment": "p/m"}}]


def test_a_held_chunk_goes_out_before_an_error():
    fmt = OpenAIStream(False)
    assert fmt.chunk(_STOP) == []
    frames = fmt.error(InvalidRequest("broken"))
    assert json.loads(frames[0].removeprefix("data: ")) == _STOP and '"error"' in frames[1]
