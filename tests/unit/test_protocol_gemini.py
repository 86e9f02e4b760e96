"""Gemini generateContent ⇄ canonical: requests, responses, errors and SSE streams, both directions."""

import json

import pytest

from common.errors import InvalidRequest, UpstreamError, UpstreamUnavailable
from common.protocols import gemini
from common.protocols.shared import stable_id
from common.types import ChatRequest

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
HI = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
USER_HI = {"role": "user", "parts": [{"text": "Hi"}]}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time"}}
SIGNED = {"extra_content": {"google": {"thought_signature": "c2ln"}}}
DECLARATIONS = {"functionDeclarations": [{"name": "get_weather", "description": "Weather for a city",
                                          "parametersJsonSchema": SCHEMA},
                                         {"name": "get_time", "description": "Current time"}]}


def cases(table):
    """parametrize arguments for a table of (id, *values) rows."""
    return {"argvalues": [row[1:] for row in table], "ids": [row[0] for row in table]}


def call(call_id, name, arguments, **extra):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}, **extra}


def body(**fields):
    return {"contents": [USER_HI], **fields}


def expect(**fields):
    return {"model": "gemini-2.5-flash", "messages": HI, **fields}


# ---- ingress requests -------------------------------------------------------------------------------

PARSE = [
    ("minimal", body(), expect()),
    ("role-defaults-to-user", {"contents": [{"parts": [{"text": "Hi"}]}]}, expect()),
    ("system-instruction-snake-case",
     {"system_instruction": {"parts": [{"text": "You are a cat."}, {"text": "Meow."}]},
      "contents": [USER_HI]},
     expect(messages=[{"role": "system", "content": "You are a cat.\nMeow."}, *HI])),
    ("multi-turn", body(contents=[USER_HI, {"role": "model", "parts": [{"text": "Hello!"}]},
                                  {"role": "user", "parts": [{"text": "Bye"}]}]),
     expect(messages=[*HI, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": [{"type": "text", "text": "Bye"}]}])),
    ("inline-and-file-data", body(contents=[{"role": "user", "parts": [
        {"text": "Compare"}, {"inlineData": {"mimeType": "image/png", "data": PNG}},
        {"file_data": {"mime_type": "image/jpeg", "file_uri": "https://example.com/cat.jpg"}},
        {"inline_data": {"mime_type": "application/pdf", "data": "JVBERi0="}}]}]),
     expect(messages=[{"role": "user", "content": [
         {"type": "text", "text": "Compare"},
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
         {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
         {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}]}])),
    ("generation-config", body(generationConfig={
        "temperature": 1.2, "topP": 0.9, "topK": 40, "maxOutputTokens": 256, "stopSequences": ["END"],
        "candidateCount": 2, "seed": 5, "presencePenalty": 0.5, "thinkingConfig": {"thinkingBudget": 0}}),
     expect(temperature=1.2, top_p=0.9, max_tokens=256, stop=["END"], n=2, seed=5, presence_penalty=0.5)),
    ("json-mode", body(generationConfig={"responseMimeType": "application/json"}),
     expect(response_format={"type": "json_object"})),
    ("openapi-response-schema", body(generationConfig={
        "response_mime_type": "application/json",
        "response_schema": {"type": "OBJECT", "properties": {"city": {"type": "STRING", "nullable": True}},
                            "propertyOrdering": ["city"]}}),
     expect(response_format={"type": "json_schema", "json_schema": {"name": "response", "schema": {
         "type": "object", "properties": {"city": {"type": ["string", "null"]}}}}})),
    ("tools-mode-any-one-name", body(tools=[DECLARATIONS], toolConfig={"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["get_time"]}}),
     expect(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})),
    ("tools-mode-any-narrows", body(
        tools=[DECLARATIONS, {"function_declarations": [
            {"name": "x", "parameters": {"type": "OBJECT", "properties": {"n": {"type": "INTEGER"}}}}]}],
        tool_config={"function_calling_config": {"mode": "ANY",
                                                 "allowed_function_names": ["get_time", "x"]}}),
     expect(tools=[TIME, {"type": "function", "function": {"name": "x", "parameters": {
         "type": "object", "properties": {"n": {"type": "integer"}}}}}], tool_choice="required")),
    ("tools-mode-none", body(tools=[DECLARATIONS], toolConfig={"functionCallingConfig": {"mode": "NONE"}}),
     expect(tools=[WEATHER, TIME], tool_choice="none")),
    ("parallel-calls-and-responses", body(contents=[
        {"role": "user", "parts": [{"text": "Paris weather and the time?"}]},
        {"role": "model", "parts": [
            {"text": "thinking…", "thought": True},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
            {"functionCall": {"name": "get_time", "args": {}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_time", "response": {"output": "12:00"}}},
            {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}}]}]),
     expect(messages=[
         {"role": "user", "content": [{"type": "text", "text": "Paris weather and the time?"}]},
         {"role": "assistant", "tool_calls": [
             call("call_1_1", "get_weather", '{"city":"Paris"}', **SIGNED),
             call("call_1_2", "get_time", "{}")]},
         {"role": "tool", "content": '{"output": "12:00"}', "tool_call_id": "call_1_2"},
         {"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call_1_1"}])),
    ("call-ids-when-given", body(contents=[
        {"role": "model", "parts": [{"functionCall": {"id": "fc_1", "name": "f", "args": {"a": 1}}},
                                    {"functionCall": {"id": "fc_2", "name": "f", "args": {"a": 2}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"id": "fc_2", "name": "f", "response": {"r": 2}}},
            {"functionResponse": {"id": "fc_1", "name": "f", "response": {"r": 1}}}]}]),
     expect(messages=[
         {"role": "assistant", "tool_calls": [call("fc_1", "f", '{"a":1}'), call("fc_2", "f", '{"a":2}')]},
         {"role": "tool", "content": '{"r": 2}', "tool_call_id": "fc_2"},
         {"role": "tool", "content": '{"r": 1}', "tool_call_id": "fc_1"}])),
]


@pytest.mark.parametrize("gemini_body,canonical", **cases(PARSE))
def test_parse_request(gemini_body, canonical):
    request = gemini.parse_request(gemini_body, "models/gemini-2.5-flash")
    assert request.upstream_body("gemini-2.5-flash") == canonical


def test_parse_request_stream_comes_from_the_endpoint():
    assert gemini.parse_request(body(), "gemini-2.5-flash", stream=True).stream is True


INVALID = [
    ("not-an-object", None, None, "JSON object"),
    ("missing-contents", {}, "contents", "missing required parameter: 'contents'"),
    ("empty-contents", {"contents": []}, "contents", "at least one"),
    ("bad-role", body(contents=[{"role": "assistant", "parts": [{"text": "x"}]}]), "contents.0.role",
     "'user' or 'model'"),
    ("parts-missing", body(contents=[{"role": "user"}]), "contents.0.parts", "missing required"),
    ("inline-without-mime", body(contents=[{"role": "user", "parts": [{"inlineData": {"data": "AAAA"}}]}]),
     "contents.0.parts.0.inlineData.mimeType", "missing required"),
    ("audio-inline", body(contents=[{"role": "user", "parts": [
        {"inlineData": {"mimeType": "audio/wav", "data": "A"}}]}]),
     "contents.0.parts.0.inlineData.mimeType", "not supported"),
    ("video-file", body(contents=[{"role": "user", "parts": [
        {"fileData": {"mimeType": "video/mp4", "fileUri": "https://x/v.mp4"}}]}]),
     "contents.0.parts.0.fileData.mimeType", "not supported"),
    ("function-call-without-name",
     body(contents=[{"role": "model", "parts": [{"functionCall": {"args": {}}}]}]),
     "contents.0.parts.0.functionCall.name", "missing required"),
    ("function-response-not-object", body(contents=[{"role": "user", "parts": [{"functionResponse": "x"}]}]),
     "contents.0.parts.0.functionResponse", "an object"),
    ("server-tool", body(tools=[{"googleSearch": {}}]), "tools.0", "not supported"),
    ("bad-mode", body(tools=[DECLARATIONS], toolConfig={"functionCallingConfig": {"mode": "SOMETIMES"}}),
     "toolConfig.functionCallingConfig.mode", "AUTO, ANY, NONE or VALIDATED"),
    ("temperature-too-high", body(generationConfig={"temperature": 2.5}), "generationConfig.temperature",
     "between 0 and 2"),
    ("max-output-tokens-string", body(generationConfig={"maxOutputTokens": "10"}),
     "generationConfig.maxOutputTokens", "an integer"),
    ("enum-mime-type", body(generationConfig={"responseMimeType": "text/x.enum"}),
     "generationConfig.responseMimeType", "not supported"),
    ("cached-content", body(cachedContent="cachedContents/abc"), "cachedContent", "not supported"),
]


@pytest.mark.parametrize("gemini_body,param,fragment", **cases(INVALID))
def test_parse_request_rejects(gemini_body, param, fragment):
    with pytest.raises(InvalidRequest) as err:
        gemini.parse_request(gemini_body, "gemini-2.5-flash")
    assert err.value.param == param
    assert fragment in err.value.message


def test_streaming_several_candidates_is_rejected():
    with pytest.raises(InvalidRequest) as err:
        gemini.parse_request(body(generationConfig={"candidateCount": 2}), "m", stream=True)
    assert err.value.param == "generationConfig.candidateCount"


# ---- egress requests --------------------------------------------------------------------------------


def canonical(**fields):
    messages = [{"role": "user", "content": "Hi"}]
    return ChatRequest.model_validate({"model": "alias", "messages": messages, **fields})


TO_UPSTREAM = [
    ("minimal", canonical(), {"contents": [USER_HI]}),
    ("system-hoisted", canonical(messages=[{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"},
                                           {"role": "developer", "content": "No emoji."}]),
     {"contents": [USER_HI], "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "No emoji."}]}}),
    ("images", canonical(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=",
                                  "filename": "a.pdf"}}]}]),
     {"contents": [{"role": "user", "parts": [
         {"inlineData": {"mimeType": "image/png", "data": PNG}},
         {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.png"}},
         {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}}]}]}),
    ("generation-config", canonical(temperature=1.5, top_p=0.9, max_tokens=100, stop="END", n=2, seed=3,
                                    top_k=20, presence_penalty=0.1, frequency_penalty=0.2, user="u"),
     {"contents": [USER_HI], "generationConfig": {
         "temperature": 1.5, "topP": 0.9, "topK": 20, "maxOutputTokens": 100, "stopSequences": ["END"],
         "candidateCount": 2, "seed": 3, "presencePenalty": 0.1, "frequencyPenalty": 0.2}}),
    ("json-schema",
     canonical(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}),
     {"contents": [USER_HI], "generationConfig": {"responseMimeType": "application/json",
                                                  "responseJsonSchema": SCHEMA}}),
    ("json-object", canonical(response_format={"type": "json_object"}),
     {"contents": [USER_HI], "generationConfig": {"responseMimeType": "application/json"}}),
    ("tools-specific-choice", canonical(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}),
     {"contents": [USER_HI], "tools": [DECLARATIONS],
      "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}}),
    ("tools-required", canonical(tools=[WEATHER], tool_choice="required"),
     {"contents": [USER_HI], "tools": [{"functionDeclarations": DECLARATIONS["functionDeclarations"][:1]}],
      "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}}),
    ("parallel-calls-responses-share-a-turn", canonical(messages=[
        {"role": "user", "content": "Paris weather and the time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            call("call_1", "get_weather", '{"city":"Paris"}', **SIGNED), call("call_2", "get_time", "")]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]),
     {"contents": [
         {"role": "user", "parts": [{"text": "Paris weather and the time?"}]},
         {"role": "model", "parts": [
             {"text": "Checking."},
             {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
             {"functionCall": {"name": "get_time", "args": {}}}]},
         {"role": "user", "parts": [
             {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
             {"functionResponse": {"name": "get_time", "response": {"output": "12:00"}}}]}]}),
]


@pytest.mark.parametrize("request_,expected", **cases(TO_UPSTREAM))
def test_to_upstream(request_, expected):
    assert gemini.to_upstream(request_) == expected


TO_UPSTREAM_INVALID = [
    ("orphan-tool-result", canonical(messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}]),
     "messages.0.tool_call_id"),
    ("audio", canonical(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages.0.content.0.type"),
    ("legacy-function-role", canonical(messages=[{"role": "function", "name": "f", "content": "x"}]),
     "messages.0.role"),
]


@pytest.mark.parametrize("request_,param", **cases(TO_UPSTREAM_INVALID))
def test_to_upstream_rejects(request_, param):
    with pytest.raises(InvalidRequest) as err:
        gemini.to_upstream(request_)
    assert err.value.param == param


@pytest.mark.parametrize("model,stream,path", [
    ("gemini-2.5-flash", False, "models/gemini-2.5-flash:generateContent"),
    ("models/gemini-2.5-pro", True, "models/gemini-2.5-pro:streamGenerateContent?alt=sse")],
                         ids=["unary", "stream"])
def test_upstream_path(model, stream, path):
    assert gemini.upstream_path(model, stream=stream) == path


# ---- responses --------------------------------------------------------------------------------------

USAGE = {"promptTokenCount": 20, "candidatesTokenCount": 10, "totalTokenCount": 30}


def response(parts, finish="STOP", usage=None, **extra):
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
    return {"candidates": [candidate], "usageMetadata": usage or USAGE, "modelVersion": "gemini-2.5-flash",
            "responseId": "resp_1", **extra}


def completion(message, finish_reason, usage=None):
    return {"id": "resp_1", "object": "chat.completion", "created": 1700000000, "model": "gemini-2.5-flash",
            "choices": [{"index": 0, "logprobs": None, "message": message, "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}}


FROM_UPSTREAM = [
    ("text", response([{"text": "Hello "}, {"text": "there."}]),
     completion({"role": "assistant", "content": "Hello there."}, "stop")),
    ("parallel-function-calls", response([
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
        {"functionCall": {"id": "fc_2", "name": "get_weather", "args": {"city": "Rome"}}}]),
     completion({"role": "assistant", "content": None, "tool_calls": [
         call(stable_id("call_", "resp_1", 0, 0), "get_weather", '{"city":"Paris"}',
              extra_content={"google": {"thought_signature": "c2ln"}}),
         call("fc_2", "get_weather", '{"city":"Rome"}')]}, "tool_calls")),
    ("max-tokens", response([{"text": "Once"}], "MAX_TOKENS"),
     completion({"role": "assistant", "content": "Once"}, "length")),
    ("safety", response([], "SAFETY"), completion({"role": "assistant", "content": ""}, "content_filter")),
    ("thoughts-and-cache", response([{"text": "plan", "thought": True}, {"text": "42"}], "STOP", {
        "promptTokenCount": 100, "cachedContentTokenCount": 60, "candidatesTokenCount": 2,
        "thoughtsTokenCount": 30, "totalTokenCount": 132}),
     completion({"role": "assistant", "content": "42"}, "stop", {
         "prompt_tokens": 100, "completion_tokens": 32, "total_tokens": 132,
         "prompt_tokens_details": {"cached_tokens": 60},
         "completion_tokens_details": {"reasoning_tokens": 30}})),
    ("prompt-blocked", {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": USAGE,
                        "modelVersion": "gemini-2.5-flash", "responseId": "resp_1"},
     completion({"role": "assistant", "content": ""}, "content_filter")),
]


@pytest.mark.parametrize("data,expected", **cases(FROM_UPSTREAM))
def test_from_upstream(data, expected):
    result = gemini.from_upstream(data, created=1700000000)
    assert result.body == expected
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"])


def test_from_upstream_several_candidates():
    data = {"candidates": [{"content": {"role": "model", "parts": [{"text": "A"}]}, "finishReason": "STOP"},
                           {"content": {"role": "model", "parts": [{"text": "B"}]},
                            "finishReason": "MAX_TOKENS", "index": 1}],
            "usageMetadata": USAGE, "responseId": "r"}
    choices = gemini.from_upstream(data, created=0).body["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "A", "stop"), (1, "B", "length")]


RENDER = [
    ("text", completion({"role": "assistant", "content": "Hi!"}, "stop"),
     {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi!"}]}, "index": 0,
                      "finishReason": "STOP"}],
      "usageMetadata": USAGE, "modelVersion": "alias", "responseId": "resp_1"}),
    ("tool-calls-with-ids-and-signature", completion({"role": "assistant", "content": None, "tool_calls": [
        call("call_1", "get_weather", '{"city":"Paris"}', **SIGNED), call("call_2", "get_time", "")]},
        "tool_calls", {"prompt_tokens": 20, "completion_tokens": 10,
                       "completion_tokens_details": {"reasoning_tokens": 4}}),
     {"candidates": [{"content": {"role": "model", "parts": [
         {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"},
          "thoughtSignature": "c2ln"},
         {"functionCall": {"name": "get_time", "args": {}, "id": "call_2"}}]},
                      "index": 0, "finishReason": "STOP"}],
      "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 6, "totalTokenCount": 30,
                        "thoughtsTokenCount": 4},
      "modelVersion": "alias", "responseId": "resp_1"}),
]


@pytest.mark.parametrize("canonical_body,expected", **cases(RENDER))
def test_render_response(canonical_body, expected):
    assert gemini.render_response(canonical_body, "alias") == expected


FINISH = [("STOP", "stop", "STOP"), ("MAX_TOKENS", "length", "MAX_TOKENS"),
          ("SAFETY", "content_filter", "SAFETY"), ("RECITATION", "content_filter", "SAFETY"),
          ("PROHIBITED_CONTENT", "content_filter", "SAFETY"),
          ("MALFORMED_FUNCTION_CALL", "stop", "STOP"), ("OTHER", "stop", "STOP")]


@pytest.mark.parametrize("reason,finish_reason,back", FINISH, ids=[c[0] for c in FINISH])
def test_finish_reasons_map_both_ways(reason, finish_reason, back):
    body_ = gemini.from_upstream(response([{"text": "x"}], reason), created=0).body
    assert body_["choices"][0]["finish_reason"] == finish_reason
    assert gemini.render_response(body_, "m")["candidates"][0]["finishReason"] == back


ERRORS = [(400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"), (404, "NOT_FOUND"), (413, "INVALID_ARGUMENT"),
          (429, "RESOURCE_EXHAUSTED"), (502, "INTERNAL"), (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED")]


@pytest.mark.parametrize("status,name", ERRORS, ids=[str(c[0]) for c in ERRORS])
def test_render_error(status, name):
    expected = {"error": {"code": status, "message": "nope", "status": name}}
    assert gemini.render_error(status, "any", "nope") == expected


def test_render_error_names_the_parameter_as_a_field_violation():
    assert gemini.render_error(400, "invalid_request_error", "bad tool", param="tools.0") == {"error": {
        "code": 400, "message": "bad tool", "status": "INVALID_ARGUMENT", "details": [{
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "tools.0", "description": "bad tool"}]}]}}


@pytest.mark.parametrize("data,message", [
    ({"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}, "Quota exceeded"),
    ([{"error": {"code": 400, "message": "Bad", "status": "INVALID_ARGUMENT"}}], "Bad"),
    ({"candidates": []}, None)], ids=["object", "array", "not-an-error"])
def test_upstream_error_message(data, message):
    assert gemini.upstream_error_message(data) == message


# ---- streams ----------------------------------------------------------------------------------------

UPSTREAM_EVENTS = [
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "Let me "}]}, "index": 0}],
     "usageMetadata": {"promptTokenCount": 20, "totalTokenCount": 20}, "modelVersion": "gemini-2.5-flash",
     "responseId": "resp_9"},
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "check."}]}, "index": 0}],
     "usageMetadata": {"promptTokenCount": 20, "totalTokenCount": 20}, "modelVersion": "gemini-2.5-flash",
     "responseId": "resp_9"},
    {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]},
                     "finishReason": "STOP", "index": 0}],
     "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 15, "totalTokenCount": 35},
     "modelVersion": "gemini-2.5-flash", "responseId": "resp_9"},
]


def chunk(delta, finish_reason=None):
    return {"id": "resp_9", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gemini-2.5-flash",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


CANONICAL_CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Let me "}),
    chunk({"content": "check."}),
    chunk({"tool_calls": [{"index": 0, "id": stable_id("call_", "resp_9", 0, 0), "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                           "extra_content": {"google": {"thought_signature": "c2ln"}}}]}),
    chunk({"tool_calls": [{"index": 1, "id": stable_id("call_", "resp_9", 0, 1), "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}),
    chunk({}, "tool_calls"),
    {"id": "resp_9", "object": "chat.completion.chunk", "created": 1700000000, "model": "gemini-2.5-flash",
     "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 15, "total_tokens": 35}},
]


def map_upstream(events):
    mapper = gemini.UpstreamStreamMapper(created=1700000000)
    return [c for event in events for c in mapper.feed(event)] + mapper.close()


def test_upstream_stream_with_parallel_function_calls():
    assert map_upstream(UPSTREAM_EVENTS) == CANONICAL_CHUNKS


STREAM_FAILURES = [
    ("no-finish-reason", UPSTREAM_EVENTS[:2], UpstreamUnavailable),
    ("error-event",
     [{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}],
     UpstreamError),
]


@pytest.mark.parametrize("events,error", **cases(STREAM_FAILURES))
def test_upstream_stream_failures(events, error):
    with pytest.raises(error):
        map_upstream(events)


def test_upstream_stream_blocked_prompt():
    chunks = map_upstream([{"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": USAGE,
                            "responseId": "r"}])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, "content_filter"]


def openai_chunk(delta, finish_reason=None):
    return {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "gpt",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def gemini_chunk(parts, **extra):
    candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
    return {"candidates": [{**candidate, **extra.pop("candidate", {})}], "modelVersion": "alias",
            "responseId": "chatcmpl-7", **extra}


def test_stream_renderer_text_then_parallel_tool_calls():
    chunks = [
        openai_chunk({"role": "assistant", "content": ""}),
        openai_chunk({"content": "Checking."}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Pa'}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]}),
        openai_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                      "function": {"name": "get_time", "arguments": ""}}]}),
        openai_chunk({}, "tool_calls"),
        {**openai_chunk({}), "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9}},
    ]
    renderer = gemini.StreamRenderer("alias")
    out = [o for c in chunks for o in renderer.feed(c)] + renderer.close()
    assert out == [
        gemini_chunk([{"text": "Checking."}]),
        gemini_chunk([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_a"}},
                      {"functionCall": {"name": "get_time", "args": {}, "id": "call_b"}}],
                     candidate={"finishReason": "STOP"},
                     usageMetadata={"promptTokenCount": 12, "candidatesTokenCount": 9,
                                    "totalTokenCount": 21}),
    ]


def test_stream_renderer_text_only():
    renderer = gemini.StreamRenderer("alias")
    out = [o for c in [openai_chunk({"content": "Hi"}), openai_chunk({}, "length")] for o in renderer.feed(c)]
    out += renderer.close()
    assert out == [gemini_chunk([{"text": "Hi"}]),
                   gemini_chunk([{"text": ""}], candidate={"finishReason": "MAX_TOKENS"},
                                usageMetadata={"promptTokenCount": 0, "candidatesTokenCount": 0,
                                               "totalTokenCount": 0})]


# ---- round trips ------------------------------------------------------------------------------------

ROUND_TRIP_IDS = ("multi-turn", "parallel-calls-and-responses", "tools-mode-any-one-name",
                  "inline-and-file-data")
ROUND_TRIPS = [c for c in PARSE if c[0] in ROUND_TRIP_IDS]


def _camel(content):
    """The camelCase spelling of a content (egress always writes camelCase)."""
    text = json.dumps(content).replace('"inline_data"', '"inlineData"').replace('"file_data"', '"fileData"')
    return json.loads(text.replace('"mime_type"', '"mimeType"').replace('"file_uri"', '"fileUri"'))


@pytest.mark.parametrize("gemini_body", [c[1] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_request_round_trip_keeps_meaning(gemini_body):
    """Gemini → canonical → Gemini: same turns (thought parts dropped, responses named), same tools."""
    again = gemini.to_upstream(gemini.parse_request(gemini_body, "m"))
    expected = [{"role": c.get("role", "user"), "parts": [p for p in c["parts"] if not p.get("thought")]}
                for c in _camel(gemini_body["contents"])]
    assert again["contents"] == expected
    assert again.get("tools") == gemini_body.get("tools")
    assert again.get("toolConfig") == gemini_body.get("toolConfig")


def _calls(parts):
    return [(p["functionCall"]["name"], p["functionCall"]["args"], p.get("thoughtSignature"))
            for p in parts if "functionCall" in p]


@pytest.mark.parametrize("data", [c[1] for c in FROM_UPSTREAM[:3]], ids=[c[0] for c in FROM_UPSTREAM[:3]])
def test_response_round_trip_keeps_meaning(data):
    again = gemini.render_response(gemini.from_upstream(data, created=0).body, "gemini-2.5-flash")
    parts = again["candidates"][0]["content"]["parts"]
    original = data["candidates"][0]["content"]["parts"]
    assert "".join(p.get("text", "") for p in parts) == "".join(p.get("text", "") for p in original)
    assert _calls(parts) == _calls(original)
    assert again["candidates"][0]["finishReason"] == data["candidates"][0]["finishReason"]
    assert again["usageMetadata"] == data["usageMetadata"]
