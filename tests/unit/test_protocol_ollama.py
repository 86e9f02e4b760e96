"""Ollama /api/chat ⇄ canonical: requests, responses, errors and NDJSON streams, both directions."""

import json

import pytest

from common.errors import InvalidRequest, UpstreamError, UpstreamUnavailable
from common.protocols import ollama
from common.protocols.shared import stable_id
from common.types import ChatRequest

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
JPEG = "/9j/4AAQSkZJRgABAQAAAQABAAD"
HI = [{"role": "user", "content": "Hi"}]
SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time",
                                         "parameters": {"type": "object", "properties": {}}}}
HISTORY = [{"role": "system", "content": "Be brief."}, *HI, {"role": "assistant", "content": "Hello!"},
           {"role": "user", "content": "Bye"}]


def cases(table):
    """parametrize arguments for a table of (id, *values) rows."""
    return {"argvalues": [row[1:] for row in table], "ids": [row[0] for row in table]}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def body(**fields):
    return {"model": "llama3.2", "messages": HI, **fields}


def expect(**fields):
    return {"model": "llama3.2", "messages": HI, "stream": True, **fields}


# ---- ingress requests -------------------------------------------------------------------------------

PARSE = [
    ("minimal-streams-by-default", body(), expect()),
    ("stream-false", body(stream=False), {"model": "llama3.2", "messages": HI}),
    ("system-and-history", body(messages=HISTORY), expect(messages=HISTORY)),
    ("images-become-data-urls",
     body(messages=[{"role": "user", "content": "What is this?", "images": [PNG, JPEG]}]),
     expect(messages=[{"role": "user", "content": [
         {"type": "text", "text": "What is this?"},
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
         {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}}]}])),
    ("options", body(options={"temperature": 0, "top_p": 0.9, "top_k": 40, "num_predict": 128,
                              "num_ctx": 8192, "stop": ["<|eot|>"], "seed": 101, "presence_penalty": 0.5},
                     keep_alive="5m"),
     expect(temperature=0, top_p=0.9, max_tokens=128, stop=["<|eot|>"], seed=101, presence_penalty=0.5)),
    ("num-predict-unlimited", body(options={"num_predict": -1}), expect()),
    ("format-json", body(format="json"), expect(response_format={"type": "json_object"})),
    ("format-schema", body(format=SCHEMA),
     expect(response_format={"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA}})),
    ("tools-parallel-calls-results-by-name", body(tools=[WEATHER, TIME], messages=[
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": "18C", "tool_name": "get_weather"}]),
     expect(tools=[WEATHER, TIME], messages=[
         {"role": "user", "content": "Weather in Paris, and the time?"},
         {"role": "assistant", "tool_calls": [call("call_1_0", "get_weather", '{"city":"Paris"}'),
                                              call("call_1_1", "get_time", "{}")]},
         {"role": "tool", "content": "12:00", "tool_call_id": "call_1_1"},
         {"role": "tool", "content": "18C", "tool_call_id": "call_1_0"}])),
    ("tool-results-by-id-or-order", body(messages=[
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_x", "function": {"index": 0, "name": "f", "arguments": {"a": 1}}},
            {"function": {"index": 1, "name": "f", "arguments": {"a": 2}}}]},
        {"role": "tool", "content": "one", "tool_call_id": "call_x"},
        {"role": "tool", "content": "two"}]),
     expect(messages=[
         {"role": "assistant", "tool_calls": [call("call_x", "f", '{"a":1}'),
                                              call("call_0_1", "f", '{"a":2}')]},
         {"role": "tool", "content": "one", "tool_call_id": "call_x"},
         {"role": "tool", "content": "two", "tool_call_id": "call_0_1"}])),
]


@pytest.mark.parametrize("ollama_body,canonical", **cases(PARSE))
def test_parse_request(ollama_body, canonical):
    assert ollama.parse_request(ollama_body).upstream_body("llama3.2") == canonical


INVALID = [
    ("not-an-object", "hi", None, "JSON object"),
    ("missing-model", {"messages": HI}, "model", "missing required parameter: 'model'"),
    ("empty-messages-load-request", body(messages=[]), "messages", "at least one message"),
    ("bad-role", body(messages=[{"role": "bot", "content": "x"}]), "messages.0.role",
     "system, user, assistant, tool"),
    ("content-not-string", body(messages=[{"role": "user", "content": ["x"]}]), "messages.0.content",
     "a string"),
    ("images-not-strings", body(messages=[{"role": "user", "content": "x", "images": [1]}]),
     "messages.0.images", "array of strings"),
    ("tool-call-without-function", body(messages=[{"role": "assistant", "tool_calls": [{"name": "f"}]}]),
     "messages.0.tool_calls.0.function", "missing required"),
    ("tool-call-arguments-number", body(messages=[{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": 3}}]}]), "messages.0.tool_calls.0.function.arguments",
     "an object"),
    ("temperature-too-high", body(options={"temperature": 3}), "options.temperature", "between 0 and 2"),
    ("options-stop-not-strings", body(options={"stop": [1]}), "options.stop", "array of strings"),
    ("format-unknown", body(format="xml"), "format", "JSON schema"),
    ("tool-without-name", body(tools=[{"type": "function", "function": {"description": "x"}}]),
     "tools.0.function.name", "missing required"),
    ("stream-not-bool", body(stream="yes"), "stream", "a boolean"),
]


@pytest.mark.parametrize("ollama_body,param,fragment", **cases(INVALID))
def test_parse_request_rejects(ollama_body, param, fragment):
    with pytest.raises(InvalidRequest) as err:
        ollama.parse_request(ollama_body)
    assert err.value.param == param
    assert fragment in err.value.message


# ---- egress requests --------------------------------------------------------------------------------


def canonical(**fields):
    return ChatRequest.model_validate({"model": "alias", "messages": HI, **fields})


def upstream(**fields):
    return {"model": "llama3.2:3b", "messages": HI, "stream": False, **fields}


TO_UPSTREAM = [
    ("stream-always-explicit", canonical(), upstream()),
    ("stream-true", canonical(stream=True), upstream(stream=True)),
    ("developer-is-system-parts-joined-images-inline", canonical(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"}, {"type": "text", "text": "these:"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}}]}]),
     upstream(messages=[{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Compare\nthese:", "images": [PNG, JPEG]}])),
    ("options", canonical(temperature=0.2, top_p=0.8, max_tokens=50, max_completion_tokens=64, stop="END",
                          seed=7, top_k=20, frequency_penalty=0.1, logprobs=True),
     upstream(options={"seed": 7, "top_k": 20, "frequency_penalty": 0.1, "temperature": 0.2, "top_p": 0.8,
                       "num_predict": 64, "stop": ["END"]})),
    ("json-object", canonical(response_format={"type": "json_object"}), upstream(format="json")),
    ("json-schema",
     canonical(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}),
     upstream(format=SCHEMA)),
    ("tool-history-arguments-become-objects", canonical(tools=[WEATHER, TIME], tool_choice="auto", messages=[
        {"role": "user", "content": "Paris weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("call_1", "get_weather", '{"city":"Paris"}'), call("call_2", "get_time", "")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]),
     upstream(tools=[WEATHER, TIME], messages=[
         {"role": "user", "content": "Paris weather and time?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"function": {"name": "get_time", "arguments": {}}}]},
         {"role": "tool", "content": "18C", "tool_name": "get_weather"},
         {"role": "tool", "content": "12:00", "tool_name": "get_time"}])),
    ("tool-choice-none-sends-no-tools", canonical(tools=[WEATHER], tool_choice="none"), upstream()),
    ("tool-choice-function-sends-only-it", canonical(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_time"}}), upstream(tools=[TIME])),
    ("tool-choice-required-cannot-be-enforced", canonical(tools=[WEATHER], tool_choice="required"),
     upstream(tools=[WEATHER])),
]


@pytest.mark.parametrize("request_,expected", **cases(TO_UPSTREAM))
def test_to_upstream(request_, expected):
    assert ollama.to_upstream(request_, "llama3.2:3b") == expected


TO_UPSTREAM_INVALID = [
    ("image-by-url", canonical(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]),
     "messages.0.content.0.image_url"),
    ("audio", canonical(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages.0.content.0.type"),
    ("n-above-one", canonical(n=3), "n"),
    ("legacy-function-role", canonical(messages=[{"role": "function", "name": "f", "content": "x"}]),
     "messages.0.role"),
]


@pytest.mark.parametrize("request_,param", **cases(TO_UPSTREAM_INVALID))
def test_to_upstream_rejects_what_ollama_cannot_do(request_, param):
    with pytest.raises(InvalidRequest) as err:
        ollama.to_upstream(request_, "llama3.2:3b")
    assert err.value.param == param


# ---- responses --------------------------------------------------------------------------------------

CREATED_AT = "2024-07-22T20:33:28.123648Z"
EPOCH = 1721680408
STAMP = "2024-07-22T20:33:28.000000Z"  # EPOCH as the gateway writes created_at
METRICS = {"total_duration": 885095291, "load_duration": 3753500, "prompt_eval_count": 122,
           "prompt_eval_duration": 328493000, "eval_count": 33, "eval_duration": 552222000}
RESPONSE_ID = stable_id("chatcmpl-", CREATED_AT, "llama3.2")


def ollama_response(message, done_reason="stop"):
    return {"model": "llama3.2", "created_at": CREATED_AT, "message": message, "done_reason": done_reason,
            "done": True, **METRICS}


def completion(message, finish_reason):
    return {"id": RESPONSE_ID, "object": "chat.completion", "created": EPOCH, "model": "llama3.2",
            "choices": [{"index": 0, "logprobs": None, "message": message, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 122, "completion_tokens": 33, "total_tokens": 155}}


FROM_UPSTREAM = [
    ("text", ollama_response({"role": "assistant", "content": "Hello! How are you today?"}),
     completion({"role": "assistant", "content": "Hello! How are you today?"}, "stop")),
    ("length", ollama_response({"role": "assistant", "content": "Once"}, "length"),
     completion({"role": "assistant", "content": "Once"}, "length")),
    ("parallel-tool-calls-get-stable-ids",
     ollama_response({"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather",
                      "arguments": {"format": "celsius", "location": "Paris, FR"}}},
        {"id": "call_own", "function": {"index": 1, "name": "get_time", "arguments": {}}}]}),
     completion({"role": "assistant", "content": None, "tool_calls": [
         call(stable_id("call_", CREATED_AT, 0), "get_weather",
              '{"format":"celsius","location":"Paris, FR"}'),
         call("call_own", "get_time", "{}")]}, "tool_calls")),
]


@pytest.mark.parametrize("data,expected", **cases(FROM_UPSTREAM))
def test_from_upstream(data, expected):
    response = ollama.from_upstream(data)
    assert response.body == expected
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (122, 33)


def test_from_upstream_rejects_a_malformed_response():
    with pytest.raises(UpstreamUnavailable):
        ollama.from_upstream({"error": "model 'x' not found"})


def openai_completion(message, finish_reason, usage=None):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": EPOCH, "model": "gpt",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 122, "completion_tokens": 33, "total_tokens": 155}}


RENDER = [
    ("text-with-elapsed-time", openai_completion({"role": "assistant", "content": "Hi!"}, "stop"), 5_000_000,
     {"model": "alias", "created_at": STAMP, "message": {"role": "assistant", "content": "Hi!"},
      "done_reason": "stop", "done": True, "total_duration": 5_000_000, "prompt_eval_count": 122,
      "eval_count": 33, "eval_duration": 5_000_000}),
    ("tool-calls-arguments-as-objects",
     openai_completion({"role": "assistant", "content": None, "tool_calls": [
        call("call_1", "get_weather", '{"city":"Paris"}'), call("call_2", "get_time", "")]}, "tool_calls"), 0,
     {"model": "alias", "created_at": STAMP, "message": {
         "role": "assistant", "content": "", "tool_calls": [
             {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_1"},
             {"function": {"name": "get_time", "arguments": {}}, "id": "call_2"}]},
      "done_reason": "stop", "done": True, "prompt_eval_count": 122, "eval_count": 33}),
]


@pytest.mark.parametrize("canonical_body,elapsed_ns,expected", **cases(RENDER))
def test_render_response(canonical_body, elapsed_ns, expected):
    assert ollama.render_response(canonical_body, "alias", elapsed_ns=elapsed_ns) == expected


FINISH = [("stop", "stop", "stop"), ("length", "length", "length"), ("tool_calls", "stop", None),
          ("content_filter", "stop", None)]


@pytest.mark.parametrize("finish_reason,done_reason,back", FINISH, ids=[c[0] for c in FINISH])
def test_finish_reasons_map_both_ways(finish_reason, done_reason, back):
    canonical_body = openai_completion({"role": "assistant", "content": "x"}, finish_reason)
    rendered = ollama.render_response(canonical_body, "m")
    assert rendered["done_reason"] == done_reason
    if back:
        assert ollama.from_upstream(rendered).body["choices"][0]["finish_reason"] == back


@pytest.mark.parametrize("status", [400, 404, 429, 502], ids=str)
def test_render_error_is_a_bare_message(status):
    assert ollama.render_error(status, "whatever", "model 'x' not found") == {"error": "model 'x' not found"}


def test_upstream_error_message():
    assert ollama.upstream_error_message({"error": "model 'x' not found"}) == "model 'x' not found"
    assert ollama.upstream_error_message({"message": {}}) is None


# ---- streams ----------------------------------------------------------------------------------------


def line(content="", **fields):
    return {"model": "llama3.2", "created_at": CREATED_AT,
            "message": {"role": "assistant", "content": content}, "done": False, **fields}


STREAM_ID = stable_id("chatcmpl-", CREATED_AT, "llama3.2")


def chunk(delta, finish_reason=None):
    return {"id": STREAM_ID, "object": "chat.completion.chunk", "created": EPOCH, "model": "llama3.2",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


USAGE_CHUNK = {"id": STREAM_ID, "object": "chat.completion.chunk", "created": EPOCH, "model": "llama3.2",
               "choices": [], "usage": {"prompt_tokens": 122, "completion_tokens": 33, "total_tokens": 155}}

UPSTREAM_STREAMS = [
    ("text", [line("The"), line(" sky"), line("", done=True, done_reason="stop", **METRICS)],
     [chunk({"role": "assistant", "content": ""}), chunk({"content": "The"}), chunk({"content": " sky"}),
      chunk({}, "stop"), USAGE_CHUNK]),
    ("length", [line("Once"), line("", done=True, done_reason="length", **METRICS)],
     [chunk({"role": "assistant", "content": ""}), chunk({"content": "Once"}), chunk({}, "length"),
      USAGE_CHUNK]),
    ("parallel-tool-calls-arrive-whole", [
        {**line(), "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}},
        line("", done=True, done_reason="stop", **METRICS)],
     [chunk({"role": "assistant", "content": ""}),
      chunk({"tool_calls": [{"index": 0, "id": stable_id("call_", STREAM_ID, 0), "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}),
      chunk({"tool_calls": [{"index": 1, "id": stable_id("call_", STREAM_ID, 1), "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}),
      chunk({}, "tool_calls"), USAGE_CHUNK]),
]


def map_upstream(lines):
    mapper = ollama.UpstreamStreamMapper()
    return [c for data in lines for c in mapper.feed(data)] + mapper.close()


@pytest.mark.parametrize("lines,chunks", **cases(UPSTREAM_STREAMS))
def test_upstream_stream(lines, chunks):
    assert map_upstream(lines) == chunks


@pytest.mark.parametrize("lines,error", [([line("The")], UpstreamUnavailable),
                                         ([{"error": "out of memory"}], UpstreamError)],
                         ids=["truncated", "error-line"])
def test_upstream_stream_failures(lines, error):
    with pytest.raises(error):
        map_upstream(lines)


def openai_chunk(delta, finish_reason=None, created=EPOCH):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created, "model": "gpt",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}



def ndjson(message, **fields):
    return {"model": "alias", "created_at": STAMP, "message": {"role": "assistant", **message}, "done": False,
            **fields}


def test_stream_renderer_text_then_parallel_tool_calls():
    chunks = [
        openai_chunk({"role": "assistant", "content": ""}),
        openai_chunk({"content": "Let me check."}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city":'}},
                                     {"index": 1, "id": "call_b", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city":'}}]}),
        openai_chunk({"tool_calls": [{"index": 1, "function": {"arguments": ' "Rome"}'}},
                                     {"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        openai_chunk({}, "tool_calls"),
        {**openai_chunk({}), "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 20}},
    ]
    renderer = ollama.StreamRenderer("alias")
    out = [o for c in chunks for o in renderer.feed(c)] + renderer.close(elapsed_ns=2_000_000)
    assert out == [
        ndjson({"content": "Let me check."}),
        ndjson({"content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_a"},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}, "id": "call_b"}]}),
        {"model": "alias", "created_at": STAMP, "message": {"role": "assistant", "content": ""},
         "done_reason": "stop", "done": True, "total_duration": 2_000_000, "prompt_eval_count": 40,
         "eval_count": 20, "eval_duration": 2_000_000},
    ]
    assert all(json.dumps(o) for o in out)  # every object is one NDJSON line


def test_stream_renderer_length_stop():
    renderer = ollama.StreamRenderer("alias")
    chunks = [openai_chunk({"content": "Once"}), openai_chunk({}, "length")]
    out = [o for c in chunks for o in renderer.feed(c)]
    final = renderer.close()[-1]
    assert out == [ndjson({"content": "Once"})]
    assert (final["done"], final["done_reason"], final["eval_count"]) == (True, "length", 0)


# ---- round trips ------------------------------------------------------------------------------------

ROUND_TRIPS = [c for c in PARSE if c[0] in ("system-and-history", "images-become-data-urls", "format-schema",
                                            "tools-parallel-calls-results-by-name")]


@pytest.mark.parametrize("ollama_body", [c[1] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_request_round_trip_keeps_meaning(ollama_body):
    again = ollama.to_upstream(ollama.parse_request(ollama_body), "llama3.2")
    assert again["messages"] == ollama_body["messages"]
    assert (again["stream"], again.get("format"), again.get("tools")) == (
        True, ollama_body.get("format"), ollama_body.get("tools"))


def test_stream_round_trip():
    """Ollama lines → canonical chunks → Ollama lines: the same text, calls, reason and counts."""
    lines = UPSTREAM_STREAMS[2][1][:1] + [line("Done."), line("", done=True, done_reason="stop", **METRICS)]
    renderer = ollama.StreamRenderer("llama3.2")
    out = [o for c in map_upstream(lines) for o in renderer.feed(c)] + renderer.close()
    assert [o["message"].get("tool_calls") for o in out] == [
        [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}},
          "id": stable_id("call_", STREAM_ID, 0)},
         {"function": {"name": "get_weather", "arguments": {"city": "Rome"}},
          "id": stable_id("call_", STREAM_ID, 1)}],
        None, None]
    assert [o["message"]["content"] for o in out] == ["", "Done.", ""]
    assert (out[-1]["prompt_eval_count"], out[-1]["eval_count"]) == (122, 33)
