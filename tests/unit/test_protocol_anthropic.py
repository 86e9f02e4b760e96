"""Anthropic Messages ⇄ canonical: requests, responses, errors and streams, both directions."""

import json

import pytest

from common.errors import InvalidRequest, UpstreamError, UpstreamRateLimited, UpstreamUnavailable
from common.protocols import anthropic
from common.protocols.shared import ToolCallBuffer
from common.types import ChatRequest

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER_SCHEMA}
OPENAI_WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_SCHEMA}}
HI = [{"role": "user", "content": "Hi"}]
HI_BLOCKS = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


def cases(table):
    """parametrize arguments for a table of (id, *values) rows."""
    return {"argvalues": [row[1:] for row in table], "ids": [row[0] for row in table]}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def body(**fields):
    return {"model": "claude", "max_tokens": 256, "messages": HI, **fields}


# ---- ingress requests -------------------------------------------------------------------------------

PARSE = [
    ("minimal", body(), {"model": "claude", "max_tokens": 256, "messages": HI}),
    ("system-string", body(system="Be brief."),
     {"model": "claude", "max_tokens": 256, "messages": [{"role": "system", "content": "Be brief."}, *HI]}),
    ("system-blocks-joined", body(system=[{"type": "text", "text": "Be brief."},
                                          {"type": "text", "text": "Be kind.",
                                           "cache_control": {"type": "ephemeral"}}]),
     {"model": "claude", "max_tokens": 256,
      "messages": [{"role": "system", "content": "Be brief.\n\nBe kind."}, *HI]}),
    ("multi-turn", body(messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                  {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}]}]),
     {"model": "claude", "max_tokens": 256, "messages": [
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}]}]}),
    ("images-base64-and-url", body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "Compare."}]}]),
     {"model": "claude", "max_tokens": 256, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
         {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
         {"type": "text", "text": "Compare."}]}]}),
    ("pdf-document", body(messages=[{"role": "user", "content": [
        {"type": "document",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]}]),
     {"model": "claude", "max_tokens": 256, "messages": [{"role": "user", "content": [
         {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}]}]}),
    ("sampling-and-metadata", body(temperature=0.3, top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:"],
                                   stream=True, metadata={"user_id": "u-42"}),
     {"model": "claude", "max_tokens": 256, "messages": HI, "temperature": 0.3, "top_p": 0.9,
      "stop": ["\n\nHuman:"], "stream": True, "user": "u-42"}),
    ("tools-tool-choice-any-serial", body(tools=[WEATHER_TOOL],
                                          tool_choice={"type": "any", "disable_parallel_tool_use": True}),
     {"model": "claude", "max_tokens": 256, "messages": HI, "tools": [OPENAI_WEATHER_TOOL],
      "tool_choice": "required", "parallel_tool_calls": False}),
    ("tool-choice-specific", body(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}),
     {"model": "claude", "max_tokens": 256, "messages": HI, "tools": [OPENAI_WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("tool-choice-none", body(tools=[WEATHER_TOOL], tool_choice={"type": "none"}),
     {"model": "claude", "max_tokens": 256, "messages": HI, "tools": [OPENAI_WEATHER_TOOL],
      "tool_choice": "none"}),
    ("parallel-tool-use-and-results", body(messages=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "two calls", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "24C"}],
             "is_error": False},
            {"type": "text", "text": "Which is warmer?"}]}]),
     {"model": "claude", "max_tokens": 256, "messages": [
         {"role": "user", "content": "Weather in Paris and Rome?"},
         {"role": "assistant", "content": "Checking.", "tool_calls": [
             call("toolu_1", "get_weather", '{"city":"Paris"}'),
             call("toolu_2", "get_weather", '{"city":"Rome"}')]},
         {"role": "tool", "content": "18C", "tool_call_id": "toolu_1"},
         {"role": "tool", "content": "24C", "tool_call_id": "toolu_2"},
         {"role": "user", "content": [{"type": "text", "text": "Which is warmer?"}]}]}),
    ("tool-result-image-moves-to-user", body(messages=[
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "done"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]}]),
     {"model": "claude", "max_tokens": 256, "messages": [
         {"role": "assistant", "tool_calls": [call("t1", "screenshot", "{}")]},
         {"role": "tool", "content": "done", "tool_call_id": "t1"},
         {"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]}),
]


@pytest.mark.parametrize("anthropic_body,canonical", **cases(PARSE))
def test_parse_request(anthropic_body, canonical):
    assert anthropic.parse_request(anthropic_body).upstream_body("claude") == canonical


INVALID = [
    ("not-an-object", ["hi"], None, "JSON object"),
    ("missing-model", {"max_tokens": 5, "messages": HI}, "model", "missing required parameter: 'model'"),
    ("missing-max-tokens", {"model": "claude", "messages": HI}, "max_tokens", "'max_tokens'"),
    ("max-tokens-zero", body(max_tokens=0), "max_tokens", "at least 1"),
    ("max-tokens-string", body(max_tokens="100"), "max_tokens", "expected an integer or a number"),
    ("messages-not-list", body(messages="hi"), "messages", "expected an array"),
    ("messages-empty", body(messages=[]), "messages", "at least one message"),
    ("message-not-object", body(messages=["hi"]), "messages.0", "expected an object"),
    ("system-role-in-messages", body(messages=[{"role": "system", "content": "x"}]), "messages.0.role",
     "'user' or 'assistant'"),
    ("content-missing", body(messages=[{"role": "user"}]), "messages.0.content", "missing required"),
    ("image-without-source", body(messages=[{"role": "user", "content": [{"type": "image"}]}]),
     "messages.0.content.0.source", "missing required"),
    ("image-file-source", body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]),
     "messages.0.content.0.source.type", "not supported"),
    ("unknown-block", body(messages=[{"role": "user", "content": [{"type": "search_result"}]}]),
     "messages.0.content.0.type", "not supported"),
    ("tool-use-without-id", body(messages=[{"role": "assistant", "content": [
        {"type": "tool_use", "name": "f", "input": {}}]}]), "messages.0.content.0.id", "missing required"),
    ("tool-result-without-id", body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]), "messages.0.content.0.tool_use_id", "missing required"),
    ("temperature-above-anthropic-range", body(temperature=1.5), "temperature", "between 0 and 1"),
    ("stop-sequences-not-strings", body(stop_sequences=[1]), "stop_sequences", "array of strings"),
    ("server-tool", body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools.0.type",
     "not supported"),
    ("tool-without-schema", body(tools=[{"name": "f"}]), "tools.0.input_schema", "missing required"),
    ("tool-choice-unknown", body(tools=[WEATHER_TOOL], tool_choice={"type": "sometimes"}), "tool_choice.type",
     "auto, any, tool or none"),
    ("tool-choice-tool-without-name", body(tools=[WEATHER_TOOL], tool_choice={"type": "tool"}),
     "tool_choice.name", "missing required"),
]


@pytest.mark.parametrize("anthropic_body,param,fragment", **cases(INVALID))
def test_parse_request_rejects(anthropic_body, param, fragment):
    with pytest.raises(InvalidRequest) as err:
        anthropic.parse_request(anthropic_body)
    assert err.value.status == 400
    assert err.value.param == param
    assert fragment in err.value.message


# ---- egress requests --------------------------------------------------------------------------------


def canonical(**fields):
    return ChatRequest.model_validate({"model": "alias", "messages": HI, **fields})


TO_UPSTREAM = [
    ("default-max-tokens", canonical(), {"model": "claude-x", "max_tokens": 4096, "messages": HI_BLOCKS}),
    ("max-completion-tokens-wins", canonical(max_tokens=10, max_completion_tokens=20),
     {"model": "claude-x", "max_tokens": 20, "messages": HI_BLOCKS}),
    ("system-and-developer-hoisted", canonical(messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]}]),
     {"model": "claude-x", "max_tokens": 4096, "system": "Be brief.\n\nNo emoji.", "messages": HI_BLOCKS}),
    ("sampling-clamped", canonical(temperature=1.7, top_p=0.5, stop="END", user="u-1", stream=True, seed=3),
     {"model": "claude-x", "max_tokens": 4096, "messages": HI_BLOCKS, "temperature": 1.0, "top_p": 0.5,
      "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}, "stream": True}),
    ("images", canonical(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]),
     {"model": "claude-x", "max_tokens": 4096, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "What?"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
         {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]}]}),
    ("parallel-calls-results-share-a-turn", canonical(messages=[
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("call_1", "get_weather", '{"city":"Paris"}'),
            call("call_2", "get_weather", '{"city":"Rome"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24C"}]},
        {"role": "user", "content": "Warmer?"}], tools=[OPENAI_WEATHER_TOOL], tool_choice="auto",
        parallel_tool_calls=False),
     {"model": "claude-x", "max_tokens": 4096, "messages": [
         {"role": "user", "content": [{"type": "text", "text": "Paris and Rome?"}]},
         {"role": "assistant", "content": [
             {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
             {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
             {"type": "tool_result", "tool_use_id": "call_2", "content": "24C"},
             {"type": "text", "text": "Warmer?"}]}],
      "tools": [WEATHER_TOOL], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}),
    ("tool-choice-required", canonical(tools=[OPENAI_WEATHER_TOOL], tool_choice="required"),
     {"model": "claude-x", "max_tokens": 4096, "messages": HI_BLOCKS, "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "any"}}),
    ("tool-choice-function-no-params", canonical(
        tools=[{"type": "function", "function": {"name": "now"}}],
        tool_choice={"type": "function", "function": {"name": "now"}}),
     {"model": "claude-x", "max_tokens": 4096, "messages": HI_BLOCKS,
      "tools": [{"name": "now", "input_schema": {"type": "object", "properties": {}}}],
      "tool_choice": {"type": "tool", "name": "now"}}),
    ("json-object-mode-becomes-instruction", canonical(response_format={"type": "json_object"}),
     {"model": "claude-x", "max_tokens": 4096, "messages": HI_BLOCKS,
      "system": "Respond with a single valid JSON object and nothing else."}),
    ("json-schema-mode-carries-schema", canonical(
        messages=[{"role": "system", "content": "Extract."}, *HI],
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}}),
     {"model": "claude-x", "max_tokens": 4096, "messages": HI_BLOCKS,
      "system": "Extract.\n\nRespond with a single valid JSON object and nothing else. It must match this "
                "JSON schema: " + json.dumps(WEATHER_SCHEMA)}),
]


@pytest.mark.parametrize("request_,upstream", **cases(TO_UPSTREAM))
def test_to_upstream(request_, upstream):
    assert anthropic.to_upstream(request_, "claude-x") == upstream


TO_UPSTREAM_INVALID = [
    ("n-above-one", canonical(n=2), "n"),
    ("audio-input", canonical(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]}]),
     "messages.0.content.0.type"),
    ("file-id", canonical(messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "f1"}}]}]), "messages.0.content.0.file"),
    ("tool-without-call-id", canonical(messages=[{"role": "tool", "content": "x"}]),
     "messages.0.tool_call_id"),
    ("legacy-function-role", canonical(messages=[{"role": "function", "name": "f", "content": "x"}]),
     "messages.0.role"),
]


@pytest.mark.parametrize("request_,param", **cases(TO_UPSTREAM_INVALID))
def test_to_upstream_rejects_what_anthropic_cannot_do(request_, param):
    with pytest.raises(InvalidRequest) as err:
        anthropic.to_upstream(request_, "claude-x")
    assert err.value.param == param


# ---- responses --------------------------------------------------------------------------------------


def message(content, stop_reason="end_turn", usage=None):
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 12, "output_tokens": 7}}


def completion(msg, finish_reason, usage=None):
    return {"id": "msg_01", "object": "chat.completion", "created": 1700000000, "model": "claude-x",
            "choices": [{"index": 0, "logprobs": None, "message": msg, "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}


FROM_UPSTREAM = [
    ("text", message([{"type": "text", "text": "Hello!"}]),
     completion({"role": "assistant", "content": "Hello!"}, "stop")),
    ("parallel-tool-use", message([
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}], "tool_use"),
     completion({"role": "assistant", "content": "Checking.", "tool_calls": [
         call("toolu_1", "get_weather", '{"city":"Paris"}'),
         call("toolu_2", "get_weather", '{"city":"Rome"}')]}, "tool_calls")),
    ("only-tool-use-content-null",
     message([{"type": "tool_use", "id": "t", "name": "now", "input": {}}], "tool_use"),
     completion({"role": "assistant", "content": None, "tool_calls": [call("t", "now", "{}")]},
                "tool_calls")),
    ("max-tokens", message([{"type": "text", "text": "Once upon"}], "max_tokens"),
     completion({"role": "assistant", "content": "Once upon"}, "length")),
    ("thinking-dropped-and-cache-usage", message(
        [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "42"}],
        "end_turn", {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 100,
                     "output_tokens": 3}),
     completion({"role": "assistant", "content": "42"}, "stop",
                {"prompt_tokens": 115, "completion_tokens": 3, "total_tokens": 118,
                 "prompt_tokens_details": {"cached_tokens": 100}})),
]


@pytest.mark.parametrize("upstream,expected", **cases(FROM_UPSTREAM))
def test_from_upstream(upstream, expected):
    response = anthropic.from_upstream(upstream, created=1700000000)
    assert response.body == expected
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"])


def test_from_upstream_rejects_a_malformed_message():
    with pytest.raises(UpstreamUnavailable):
        anthropic.from_upstream({"type": "message"})


RENDER = [
    ("text", completion({"role": "assistant", "content": "Hello!"}, "stop"),
     message([{"type": "text", "text": "Hello!"}])),
    ("parallel-tool-calls", completion({"role": "assistant", "content": None, "tool_calls": [
        call("call_1", "get_weather", '{"city": "Paris"}'),
        call("call_2", "get_weather", '{"city":"Rome"}')]}, "tool_calls"),
     message([{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
              {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}}],
             "tool_use")),
    ("malformed-arguments-kept", completion({"role": "assistant", "content": "", "tool_calls": [
        call("c", "f", '{"city": "Par')]}, "tool_calls"),
     message([{"type": "tool_use", "id": "c", "name": "f", "input": {"_raw_arguments": '{"city": "Par'}}],
             "tool_use")),
    ("cached-prompt-tokens", completion({"role": "assistant", "content": "ok"}, "length",
                                        {"prompt_tokens": 120, "completion_tokens": 2, "total_tokens": 122,
                                         "prompt_tokens_details": {"cached_tokens": 100}}),
     message([{"type": "text", "text": "ok"}], "max_tokens",
             {"input_tokens": 20, "output_tokens": 2, "cache_read_input_tokens": 100})),
]


@pytest.mark.parametrize("canonical_body,expected", **cases(RENDER))
def test_render_response(canonical_body, expected):
    assert anthropic.render_response(canonical_body, "claude-x") == expected


STOP_REASONS = [("end_turn", "stop", "end_turn"), ("stop_sequence", "stop", "end_turn"),
                ("max_tokens", "length", "max_tokens"), ("tool_use", "tool_calls", "tool_use"),
                ("refusal", "content_filter", "refusal"), ("pause_turn", "stop", "end_turn")]


@pytest.mark.parametrize("stop_reason,finish_reason,back", STOP_REASONS, ids=[c[0] for c in STOP_REASONS])
def test_stop_reasons_map_both_ways(stop_reason, finish_reason, back):
    body_ = anthropic.from_upstream(message([{"type": "text", "text": "x"}], stop_reason), created=0).body
    assert body_["choices"][0]["finish_reason"] == finish_reason
    assert anthropic.render_response(body_, "m")["stop_reason"] == back


ERRORS = [(400, "invalid_request_error", "invalid_request_error"),
          (401, "authentication_error", "authentication_error"), (404, "not_found_error", "not_found_error"),
          (409, "invalid_request_error", "invalid_request_error"),
          (413, "invalid_request_error", "request_too_large"), (429, "rate_limit_error", "rate_limit_error"),
          (502, "upstream_error", "api_error"), (503, "service_unavailable", "api_error"),
          (504, "timeout_error", "timeout_error")]


@pytest.mark.parametrize("status,our_type,their_type", ERRORS, ids=[str(c[0]) for c in ERRORS])
def test_render_error(status, our_type, their_type):
    assert anthropic.render_error(status, our_type, "nope") == {
        "type": "error", "error": {"type": their_type, "message": "nope"}}


def test_upstream_error_message():
    assert anthropic.upstream_error_message(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}) == "Overloaded"
    assert anthropic.upstream_error_message({"detail": "?"}) is None


# ---- streams ----------------------------------------------------------------------------------------

# A real-shaped Anthropic stream: text, then two parallel tool_use blocks (the second takes no input).
UPSTREAM_EVENTS = [
    {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 472, "cache_read_input_tokens": 100, "output_tokens": 2}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "both."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1,
     "content_block": {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1,
     "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}},
    {"type": "content_block_delta", "index": 1,
     "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2,
     "content_block": {"type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 89}},
    {"type": "message_stop"},
]


def chunk(delta, finish_reason=None):
    return {"id": "msg_01", "object": "chat.completion.chunk", "created": 1700000000, "model": "claude-x",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


CANONICAL_CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Checking "}),
    chunk({"content": "both."}),
    chunk({"tool_calls": [{"index": 0, "id": "toolu_A", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Pa"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "ris\"}"}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "toolu_B", "type": "function",
                           "function": {"name": "get_time", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
    chunk({}, "tool_calls"),
    {"id": "msg_01", "object": "chat.completion.chunk", "created": 1700000000, "model": "claude-x",
     "choices": [], "usage": {"prompt_tokens": 572, "completion_tokens": 89, "total_tokens": 661,
               "prompt_tokens_details": {"cached_tokens": 100}}},
]


def map_upstream(events):
    mapper = anthropic.UpstreamStreamMapper(created=1700000000)
    return [c for event in events for c in mapper.feed(event)] + mapper.close()


def test_upstream_stream_with_parallel_tool_use():
    assert map_upstream(UPSTREAM_EVENTS) == CANONICAL_CHUNKS


def test_upstream_stream_tool_arguments_reassemble():
    buffer = ToolCallBuffer()
    for c in map_upstream(UPSTREAM_EVENTS):
        buffer.add((c["choices"] or [{}])[0].get("delta", {}).get("tool_calls") or [])
    calls = buffer.drain()
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("toolu_A", "get_weather", {"city": "Paris"}), ("toolu_B", "get_time", {})]


STREAM_FAILURES = [
    ("overloaded", [UPSTREAM_EVENTS[0],
                    {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}],
     UpstreamUnavailable),
    ("rate-limited", [{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}],
     UpstreamRateLimited),
    ("truncated", UPSTREAM_EVENTS[:5], UpstreamUnavailable),
    ("other-error", [{"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}],
     UpstreamError),
]


@pytest.mark.parametrize("events,error", **cases(STREAM_FAILURES))
def test_upstream_stream_failures(events, error):
    with pytest.raises(error):
        map_upstream(events)


EXPECTED_EVENTS = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "alias", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Checking "}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "both."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"input_tokens": 472, "output_tokens": 89, "cache_read_input_tokens": 100}}),
    ("message_stop", {"type": "message_stop"}),
]


def render(chunks, **kwargs):
    renderer = anthropic.StreamRenderer("alias", **kwargs)
    return [e for c in chunks for e in renderer.feed(c)] + renderer.close()


def test_stream_renderer_emits_the_full_event_sequence():
    assert render(CANONICAL_CHUNKS) == EXPECTED_EVENTS


def openai_chunk(delta, finish_reason=None, usage=None):
    out = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "gpt",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage:
        out["usage"] = usage
    return out


def accumulate(events):
    """What an Anthropic SDK builds from the events: content blocks by index, stop reason, usage."""
    blocks, partial, stop_reason, usage = {}, {}, None, {}
    for name, data in events:
        if name == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
        elif name == "content_block_delta" and data["delta"]["type"] == "text_delta":
            blocks[data["index"]]["text"] += data["delta"]["text"]
        elif name == "content_block_delta":
            partial[data["index"]] = partial.get(data["index"], "") + data["delta"]["partial_json"]
        elif name == "message_delta":
            stop_reason, usage = data["delta"]["stop_reason"], data["usage"]
    for index, text in partial.items():
        blocks[index]["input"] = json.loads(text)
    return [blocks[i] for i in sorted(blocks)], stop_reason, usage


def test_stream_renderer_with_openai_parallel_tool_calls_and_late_usage():
    chunks = [
        openai_chunk({"role": "assistant", "content": None}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                      "function": {"name": "get_weather", "arguments": ""}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": " \"Paris\"}"}}]}),
        openai_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                      "function": {"name": "get_weather",
                                                   "arguments": "{\"city\": \"Rome\"}"}}]}),
        openai_chunk({}, "tool_calls"),
        {**openai_chunk({}), "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12}},
    ]
    events = render(chunks, input_tokens=25)
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 25, "output_tokens": 0}
    assert accumulate(events) == (
        [{"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
         {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Rome"}}],
        "tool_use", {"input_tokens": 30, "output_tokens": 12})


def test_stream_renderer_interleaved_fragments_stay_on_their_block():
    chunks = [
        openai_chunk({"tool_calls": [
            {"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"x"'}},
            {"index": 1, "id": "b", "function": {"name": "g", "arguments": '{"y"'}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}},
                                     {"index": 1, "function": {"arguments": ": 2}"}}]}, "tool_calls"),
    ]
    blocks, stop_reason, _ = accumulate(render(chunks))
    assert [(b["name"], b["input"]) for b in blocks] == [("f", {"x": 1}), ("g", {"y": 2})]
    assert stop_reason == "tool_use"


def test_stream_renderer_of_an_empty_stream_is_still_well_formed():
    assert [name for name, _ in render([])] == ["message_start", "message_delta", "message_stop"]


# ---- round trips ------------------------------------------------------------------------------------

ROUND_TRIP_IDS = ("system-string", "parallel-tool-use-and-results", "tool-choice-specific",
                  "images-base64-and-url", "sampling-and-metadata")
ROUND_TRIPS = [c for c in PARSE if c[0] in ROUND_TRIP_IDS]


@pytest.mark.parametrize("anthropic_body", [c[1] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_request_round_trip_keeps_meaning(anthropic_body):
    """Anthropic → canonical → Anthropic: same turns, with strings spelled as text blocks, thinking
    blocks and top_k dropped (documented), and tool results sharing the user turn."""
    again = anthropic.to_upstream(anthropic.parse_request(anthropic_body), "claude")
    assert again.get("system") == anthropic_body.get("system")
    assert again["max_tokens"] == anthropic_body["max_tokens"]
    assert again.get("tools") == anthropic_body.get("tools")
    assert again.get("tool_choice") == anthropic_body.get("tool_choice")
    for key in ("temperature", "top_p", "stop_sequences", "metadata", "stream"):
        assert again.get(key) == anthropic_body.get(key)
    assert again["messages"] == [_as_blocks(m) for m in anthropic_body["messages"]]


def _as_blocks(turn):
    content = turn["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    kept = []
    for block in blocks:
        if block["type"] == "thinking":
            continue
        if block["type"] == "tool_result":
            text = block["content"] if isinstance(block["content"], str) else block["content"][0]["text"]
            block = {"type": "tool_result", "tool_use_id": block["tool_use_id"], "content": text}
        kept.append(block)
    return {"role": turn["role"], "content": kept}


@pytest.mark.parametrize("upstream", [c[1] for c in FROM_UPSTREAM], ids=[c[0] for c in FROM_UPSTREAM])
def test_response_round_trip_keeps_meaning(upstream):
    again = anthropic.render_response(anthropic.from_upstream(upstream, created=0).body, "claude-x")
    assert again["content"] == [b for b in upstream["content"] if b["type"] != "thinking"]
    assert again["stop_reason"] == upstream["stop_reason"]
    assert again["usage"]["output_tokens"] == upstream["usage"]["output_tokens"]


def test_stream_round_trip_rebuilds_the_same_message():
    """Anthropic events → canonical chunks → Anthropic events: an SDK builds the same message."""
    original = accumulate([(e["type"], e) for e in UPSTREAM_EVENTS])
    assert accumulate(render(map_upstream(UPSTREAM_EVENTS))) == (
        original[0], original[1], {"input_tokens": 472, "output_tokens": 89, "cache_read_input_tokens": 100})
