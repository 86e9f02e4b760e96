"""The Anthropic, Ollama and Gemini adapters against a fake that speaks their wire formats for real.

One ``FakeNative`` process serves the module (started once, ~0.5 s); every test resets it. Each
table row names its provider kind first, so ``-k ollama`` runs one adapter's rows.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from common.errors import (
    UpstreamBadResponse,
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.registry import Model, Provider
from common.types import ChatRequest
from tests.fake_native import FakeNative
from tests.faults import TcpProxy
from workers.adapters import anthropic, gemini, ollama
from workers.adapters.base import Adapter, build_adapter, make_http_session

KINDS = ("anthropic", "ollama", "gemini")
KEY = "sk-native-test-key-0123456789"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a place",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}
# Claude says something before its tool calls; the fake does too, so block and call indexes differ
PREAMBLE = {"anthropic": "Let me check the weather.", "ollama": None, "gemini": None}


def cases(table: list[tuple[Any, ...]]) -> dict[str, Any]:
    """parametrize arguments for a table of (id, *values) rows."""
    return {"argvalues": [row[1:] for row in table], "ids": [row[0] for row in table]}


def per_kind(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Every (id, *values) row once per provider kind: (kind-id, kind, *values)."""
    return [(f"{kind}-{row[0]}", kind, *row[1:]) for kind in KINDS for row in rows]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeNative]:
    with FakeNative(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeNative) -> None:
    fake.reset()


def make(kind: str, base_url: str, **overrides: Any) -> Adapter:
    settings: dict[str, Any] = {"name": f"native-{kind}", "kind": kind, "base_url": base_url, "api_key": KEY,
                                "timeout": 5.0, "connect_timeout": 1.0, **overrides}
    return build_adapter(Provider(**settings), make_http_session(4))


def model(kind: str, name: str = "model-x") -> Model:
    return Model(alias="alias", provider=f"native-{kind}", model=name, max_output_tokens=1000)


def request(text: str | list[dict[str, Any]] = "hello there world", **fields: Any) -> ChatRequest:
    messages = fields.pop("messages", None) or [{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": text}]
    return ChatRequest(model="alias", messages=messages, **fields)


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A canonical stream read back the way the openai SDK would."""
    text, calls, finish, usage = "", {}, None, None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.get("id") or entry["id"]
                entry["name"] += call["function"].get("name") or ""
                entry["arguments"] += call["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return {"text": text or None, "calls": [calls[i] for i in sorted(calls)], "finish": finish,
            "usage": usage}


# ---- answers --------------------------------------------------------------------------------------------

TOOL_TURNS = [{"role": "user", "content": "what is the weather in Oslo"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "sunny and mild"}]
IMAGE = [{"type": "text", "text": "what is this"},
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]

# id, request, content (None: the kind's tool-call preamble), finish, [(name, arguments)],
# (prompt, completion) tokens
ANSWERS = [
    ("text", request(), "echo: hello there world", "stop", [], (5, 4)),
    ("tool-call", request("what is the weather in Oslo", tools=[WEATHER]), None, "tool_calls",
     [("get_weather", {"location": "Oslo"})], (8, 3)),
    ("parallel-tool-calls", request("weather in Oslo and in Rome", tools=[WEATHER]), None, "tool_calls",
     [("get_weather", {"location": "Oslo"}), ("get_weather", {"location": "Rome"})], (8, 6)),
    ("tool-choice-none", request("what is the weather in Oslo", tools=[WEATHER], tool_choice="none"),
     "echo: what is the weather in Oslo", "stop", [], (8, 7)),
    ("tool-result", request(messages=TOOL_TURNS, tools=[WEATHER]), "echo: sunny and mild", "stop", [],
     (12, 4)),
    ("image-input", request(IMAGE), "echo: what is this", "stop", [], (5, 4)),
    ("max-tokens", request("one two three four five", max_tokens=3), "echo: one two", "length", [], (7, 3)),
]


def _expected_completion(kind: str, content: str | None, tokens: tuple[int, int]) -> tuple[str | None, int]:
    if content is None and PREAMBLE[kind]:  # Anthropic's text block before its calls counts too
        return PREAMBLE[kind], tokens[1] + len(PREAMBLE[kind].split())
    return content, tokens[1]


@pytest.mark.parametrize(("kind", "chat", "content", "finish", "calls", "tokens"), **cases(per_kind(ANSWERS)))
def test_complete(fake, kind, chat, content, finish, calls, tokens):
    answer = make(kind, fake.url).complete(chat, model(kind))
    content, completion = _expected_completion(kind, content, tokens)
    choice = answer.body["choices"][0]
    assert answer.body["object"] == "chat.completion"
    assert choice["message"]["content"] == content
    assert choice["finish_reason"] == finish
    tool_calls = choice["message"].get("tool_calls", [])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls] == calls
    assert len({c["id"] for c in tool_calls}) == len(calls)  # distinct ids
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (tokens[0], completion)


@pytest.mark.parametrize(("kind", "chat", "content", "finish", "calls", "tokens"), **cases(per_kind(ANSWERS)))
def test_stream(fake, kind, chat, content, finish, calls, tokens):
    chunks = list(make(kind, fake.url).stream(chat.model_copy(update={"stream": True}), model(kind)))
    content, completion = _expected_completion(kind, content, tokens)
    got = assemble(chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == finish
    assert got["text"] == content and got["finish"] == finish
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == calls
    assert all(c["id"] for c in got["calls"]) and len({c["id"] for c in got["calls"]}) == len(calls)
    assert (got["usage"]["prompt_tokens"], got["usage"]["completion_tokens"]) == (tokens[0], completion)


def test_anthropic_streams_tool_input_in_several_fragments(fake):
    chat = request("weather in Oslo and in Rome", tools=[WEATHER], stream=True)
    chunks = list(make("anthropic", fake.url).stream(chat, model("anthropic")))
    fragments: dict[int, int] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                fragments[call["index"]] = fragments.get(call["index"], 0) + 1
    assert fragments == {0: 5, 1: 5}  # the opening delta (id, name) + four input_json_delta pieces each


def test_anthropic_parallel_tool_calls_can_be_turned_off(fake):
    chat = request("weather in Oslo and in Rome", tools=[WEATHER], parallel_tool_calls=False)
    answer = make("anthropic", fake.url).complete(chat, model("anthropic"))
    assert len(answer.body["choices"][0]["message"]["tool_calls"]) == 1
    assert fake.requests()[0]["body"]["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


# ---- what goes over the wire ------------------------------------------------------------------------

# id, stream, path, query, headers that must be present
WIRE = [
    ("anthropic", False, "/v1/messages", {}, {"x-api-key": KEY, "anthropic-version": "2023-06-01"}),
    ("anthropic", True, "/v1/messages", {}, {"x-api-key": KEY, "anthropic-version": "2023-06-01"}),
    ("ollama", False, "/api/chat", {}, {}),
    ("ollama", True, "/api/chat", {}, {}),
    ("gemini", False, "/v1beta/models/model-x:generateContent", {}, {"x-goog-api-key": KEY}),
    ("gemini", True, "/v1beta/models/model-x:streamGenerateContent", {"alt": "sse"}, {"x-goog-api-key": KEY}),
]


@pytest.mark.parametrize(("kind", "stream", "path", "query", "headers"), **cases(
    [(f"{row[0]}-{'stream' if row[1] else 'complete'}", *row) for row in WIRE]))
def test_request_on_the_wire(fake, kind, stream, path, query, headers):
    adapter = make(kind, fake.url)
    if stream:
        list(adapter.stream(request(stream=True), model(kind)))
    else:
        adapter.complete(request(), model(kind))
    [sent] = fake.requests()
    assert (sent["path"], sent["query"]) == (path, query)
    assert {k: sent["headers"].get(k) for k in headers} == headers
    if kind == "ollama":
        assert sent["body"]["stream"] is stream  # Ollama streams unless told not to
    if kind == "anthropic":
        assert sent["body"]["max_tokens"] == 1000  # the model's max_output_tokens when the caller set none
        assert sent["body"].get("stream", False) is stream


# id, the user message as the upstream received it
IMAGES = [
    ("anthropic", lambda body: body["messages"][0]["content"][1],
     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}),
    ("ollama", lambda body: body["messages"][1]["images"], [PNG]),
    ("gemini", lambda body: body["contents"][0]["parts"][1],
     {"inlineData": {"mimeType": "image/png", "data": PNG}}),
]


@pytest.mark.parametrize(("kind", "pick", "expected"), **cases([(row[0], *row) for row in IMAGES]))
def test_image_input_travels_in_the_native_shape(fake, kind, pick, expected):
    make(kind, fake.url).complete(request(IMAGE), model(kind))
    assert pick(fake.requests()[0]["body"]) == expected


# ---- errors ---------------------------------------------------------------------------------------------

# id, kind, trigger (user text, or a fail_next config), error class, HTTP status, retry_after,
# text in the message. The error code is the class's own.
ERRORS = [
    ("anthropic-429", "anthropic", {"status": 429, "retry_after": 7}, UpstreamRateLimited, 429, 7.0,
     "per-minute rate limit"),
    ("anthropic-529-overloaded", "anthropic", "status:529 hi", UpstreamUnavailable, 502, None, "overloaded"),
    ("anthropic-500", "anthropic", "status:500 hi", UpstreamUnavailable, 502, None, "HTTP 500"),
    ("anthropic-504", "anthropic", "status:504 hi", UpstreamTimeout, 504, None, "timed out"),
    ("anthropic-400", "anthropic", "status:400 hi", UpstreamRejected, 400, None, "fake error 400"),
    ("anthropic-413", "anthropic", "status:413 hi", UpstreamRejected, 413, None, "fake error 413"),
    ("ollama-429", "ollama", {"status": 429, "retry_after": 3}, UpstreamRateLimited, 429, 3.0,
     "fake error 429"),
    ("ollama-500", "ollama", "status:500 hi", UpstreamUnavailable, 502, None, "HTTP 500"),
    ("ollama-503-busy", "ollama", "status:503 hi", UpstreamUnavailable, 502, None, "HTTP 503"),
    ("ollama-400", "ollama", "status:400 hi", UpstreamRejected, 400, None, "fake error 400"),
    ("gemini-429-retry-info", "gemini", {"status": 429, "retry_after": 7}, UpstreamRateLimited, 429, 7.0,
     "exceeded your current quota"),
    ("gemini-500", "gemini", "status:500 hi", UpstreamUnavailable, 502, None, "internal error"),
    ("gemini-503", "gemini", "status:503 hi", UpstreamUnavailable, 502, None, "overloaded"),
    ("gemini-504", "gemini", "status:504 hi", UpstreamTimeout, 504, None, "timed out"),
    ("gemini-400", "gemini", "status:400 hi", UpstreamRejected, 400, None, "fake error 400"),
]


def _call(adapter: Adapter, chat: ChatRequest, mode: str, kind: str, name: str = "model-x") -> Any:
    if mode == "stream":
        return list(adapter.stream(chat.model_copy(update={"stream": True}), model(kind, name)))
    return adapter.complete(chat, model(kind, name))


@pytest.mark.parametrize("mode", ["complete", "stream"])
@pytest.mark.parametrize(("kind", "trigger", "error", "status", "retry_after", "text"), **cases(ERRORS))
def test_upstream_errors_become_ours(fake, mode, kind, trigger, error, status, retry_after, text):
    if isinstance(trigger, dict):
        fake.configure(fail_next={"count": 1, **trigger})
        trigger = "hello"
    with pytest.raises(error) as caught:
        _call(make(kind, fake.url), request(trigger), mode, kind)
    assert type(caught.value) is error
    got = caught.value
    assert (got.status, got.code, got.retry_after) == (status, error.code, retry_after)
    assert text.lower() in caught.value.message.lower()


# id, kind, model name, how the provider is built (its key), status, text in the message
REFUSALS = [
    ("ollama-model-not-pulled", "ollama", "missing-model", KEY, UpstreamRejected, 404,
     'model "missing-model" not found, try pulling it first'),
    ("gemini-unknown-model", "gemini", "missing-model", KEY, UpstreamRejected, 404,
     "models/missing-model is not found"),
    ("anthropic-wrong-key", "anthropic", "model-x", "sk-wrong-key-1234", UpstreamUnavailable, 502,
     "credentials"),
    ("gemini-wrong-key-400-api-key-invalid", "gemini", "model-x", "sk-wrong-key-1234", UpstreamUnavailable,
     502, "credentials"),
    ("gemini-no-key-403", "gemini", "model-x", None, UpstreamUnavailable, 502, "credentials"),
    ("anthropic-no-key-401", "anthropic", "model-x", None, UpstreamUnavailable, 502, "credentials"),
]


@pytest.mark.parametrize("mode", ["complete", "stream"])
@pytest.mark.parametrize(("kind", "name", "key", "error", "status", "text"), **cases(REFUSALS))
def test_refusals(fake, mode, kind, name, key, error, status, text):
    with pytest.raises(error) as caught:
        _call(make(kind, fake.url, api_key=key), request(), mode, kind, name)
    assert caught.value.status == status and text in caught.value.message
    if error is UpstreamUnavailable:
        assert caught.value.code == "upstream_auth_failed"
        assert "sk-" not in caught.value.message and "API key not valid" not in caught.value.message


def test_spent_anthropic_quota_on_a_success_is_reported(fake):
    fake.configure(quota_exhausted_s=30)
    answer = make("anthropic", fake.url).complete(request(), model("anthropic"))
    assert 28 <= answer.quota_reset_s <= 30


def test_no_spent_quota_reports_nothing(fake):
    assert make("anthropic", fake.url).complete(request(), model("anthropic")).quota_reset_s == 0


NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
QUOTAS = [
    ("nothing-spent", {"anthropic-ratelimit-requests-remaining": "10",
                       "anthropic-ratelimit-requests-reset": "2025-01-01T12:00:30Z"}, 0.0),
    ("requests-spent", {"anthropic-ratelimit-requests-remaining": "0",
                        "anthropic-ratelimit-requests-reset": "2025-01-01T12:00:30Z"}, 30.0),
    ("longest-spent-limit-wins", {"anthropic-ratelimit-requests-remaining": "0",
                                  "anthropic-ratelimit-requests-reset": "2025-01-01T12:00:30Z",
                                  "anthropic-ratelimit-output-tokens-remaining": "0",
                                  "anthropic-ratelimit-output-tokens-reset": "2025-01-01T12:01:00+00:00"},
     60.0),
    ("reset-unreadable", {"anthropic-ratelimit-tokens-remaining": "0",
                          "anthropic-ratelimit-tokens-reset": "soon"}, 1.0),
    ("reset-in-the-past", {"anthropic-ratelimit-input-tokens-remaining": "0",
                           "anthropic-ratelimit-input-tokens-reset": "2025-01-01T11:59:00Z"}, 1.0),
    ("no-headers", {}, 0.0),
]


@pytest.mark.parametrize(("headers", "expected"), **cases(QUOTAS))
def test_anthropic_quota_headers(headers, expected):
    assert anthropic.quota_exhausted_for(headers, now=NOW) == expected


def google(code: int, *details: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A Google API error body."""
    return {"error": {"code": code, "message": "from google", "details": list(details), **fields}}


RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
# id, status, headers, body, error class, retry_after
GOOGLE_ERRORS = [
    ("retry-info", 429, {},
     google(429, {"@type": RETRY_INFO, "retryDelay": "36.5s"}, status="RESOURCE_EXHAUSTED"),
     UpstreamRateLimited, 36.5),
    ("retry-after-header-wins", 429, {"retry-after": "2"},
     google(429, {"@type": RETRY_INFO, "retryDelay": "36s"}), UpstreamRateLimited, 2.0),
    ("no-retry-hint", 429, {}, google(429), UpstreamRateLimited, None),
    ("array-wrapped-key-invalid", 400, {},
     [google(400, {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"})],
     UpstreamCredentialsRejected, None),
    ("not-json", 502, {}, None, UpstreamUnavailable, None),
]


@pytest.mark.parametrize(("status", "headers", "data", "error", "retry_after"), **cases(GOOGLE_ERRORS))
def test_gemini_error_mapping(status, headers, data, error, retry_after):
    mapped = gemini.error_for("gem", status, requests.structures.CaseInsensitiveDict(headers), data)
    assert type(mapped) is error and mapped.retry_after == retry_after


def test_anthropic_429_without_retry_after_waits_for_the_spent_limit():
    headers = requests.structures.CaseInsensitiveDict({
        "anthropic-ratelimit-tokens-remaining": "0",
        "anthropic-ratelimit-tokens-reset": (datetime.now(UTC).replace(microsecond=0).isoformat())})
    mapped = anthropic.error_for("claude", 429, headers, {"type": "error", "error": {"message": "slow down"}})
    assert isinstance(mapped, UpstreamRateLimited) and mapped.retry_after == 1.0


# ---- broken connections, timeouts, failover ------------------------------------------------------------

# id, magic prefix, error class
CUTS = per_kind([
    ("connection-dropped", "drop:", UpstreamUnavailable),
    ("ended-without-terminator", "truncate:", UpstreamUnavailable),
])


@pytest.mark.parametrize("kind", KINDS)
def test_answers_and_streams_reuse_their_connection(fake, kind):
    """A stream whose last event is in hands its connection back like a whole answer does (counted as
    TCP connections the upstream accepted)."""
    with TcpProxy("127.0.0.1", urlsplit(fake.url).port or 80) as proxy:
        adapter = make(kind, proxy.url(fake.url))
        for _ in range(3):
            adapter.complete(request(), model(kind))
            list(adapter.stream(request(stream=True), model(kind)))
        assert proxy.accepted == 1


@pytest.mark.parametrize(("kind", "magic", "error"), **cases(CUTS))
def test_stream_cut_mid_way(fake, kind, magic, error):
    received = []
    with pytest.raises(error):
        chunks = make(kind, fake.url).stream(request(f"{magic} one two three four", stream=True), model(kind))
        received.extend(chunks)  # keeps what came before the error
    assert received and received[0]["choices"][0]["delta"]["role"] == "assistant"
    assert not any(c["choices"] == [] for c in received)  # no usage chunk: the stream did not finish


@pytest.mark.parametrize(("kind", "error"), [("anthropic", UpstreamUnavailable), ("ollama", UpstreamError)],
                         ids=["anthropic-error-event", "ollama-error-line"])
def test_error_reported_mid_stream(fake, kind, error):
    with pytest.raises(error) as caught:
        list(make(kind, fake.url).stream(request("fail: one two three", stream=True), model(kind)))
    assert "stream error" in caught.value.message


@pytest.mark.parametrize("kind", KINDS)
def test_a_200_with_an_error_body_is_a_bad_response(fake, kind):
    """A proxy in front of the provider answering 200 with the provider's error body: never a success."""
    with pytest.raises(UpstreamBadResponse, match="answered 200 with an error"):
        make(kind, fake.url).complete(request("bad200: hello"), model(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_body_cut_off_when_not_streaming(fake, kind):
    with pytest.raises(UpstreamUnavailable):
        make(kind, fake.url).complete(request("drop: hello"), model(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_no_answer_within_the_timeout(fake, kind):
    with pytest.raises(UpstreamTimeout):
        make(kind, fake.url, timeout=0.3).complete(request("sleep:1 hello"), model(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_stream_stalling_mid_way_times_out(fake, kind):
    fake.configure(chunk_delay_ms=1000)
    received = []
    with pytest.raises(UpstreamTimeout):
        chunks = make(kind, fake.url, timeout=0.3).stream(request("one two three", stream=True), model(kind))
        received.extend(chunks)  # keeps what came before the error
    assert received  # it failed after it had begun


def wait_idle(fake: FakeNative, timeout: float = 3.0) -> int:
    """The fake's calls in flight once none are left (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while fake.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return fake.stats()["in_flight"]


@pytest.mark.parametrize("kind", KINDS)
def test_closing_the_stream_aborts_the_upstream_call(fake, kind):
    assert wait_idle(fake) == 0  # streams abandoned by earlier tests have noticed by now
    fake.configure(chunk_delay_ms=300)  # twelve words: the whole answer would take ~4 s
    chunks = make(kind, fake.url).stream(request(" ".join(["word"] * 12), stream=True), model(kind))
    next(chunks), next(chunks)
    assert fake.stats()["in_flight"] == 1
    chunks.close()  # type: ignore[attr-defined]
    assert wait_idle(fake, timeout=1.5) == 0  # the fake noticed the closed connection at its next write


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A local port nobody listens on: connections are refused at once. Bound (never listening) for
    the whole test, so that no other process can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("mode", ["complete", "stream"])
def test_ollama_fails_over_when_the_first_host_refuses(fake, refusing_url, mode):
    adapter = make("ollama", refusing_url, fallback_base_urls=(fake.url,))
    answer = _call(adapter, request(), mode, "ollama")
    text = answer.body["choices"][0]["message"]["content"] if mode == "complete" else assemble(answer)["text"]
    assert text == "echo: hello there world"
    assert fake.stats()["calls"]["ollama"] == 1


def test_ollama_fails_over_when_the_first_host_sends_nothing_in_time(fake, silent_url):
    adapter = make("ollama", silent_url, fallback_base_urls=(fake.url,), timeout=0.3)
    assert adapter.complete(request(), model("ollama")).body["choices"][0]["message"]["content"] == \
        "echo: hello there world"


def test_ollama_with_no_host_answering(refusing_url):
    adapter = make("ollama", refusing_url, fallback_base_urls=(refusing_url,))
    with pytest.raises(UpstreamUnavailable, match="none of its 2 hosts answered"):
        adapter.complete(request(), model("ollama"))


def test_ollama_host_that_answers_with_an_error_is_final(fake):
    adapter = make("ollama", fake.url, fallback_base_urls=(fake.url,))
    with pytest.raises(UpstreamRejected):
        adapter.complete(request(), model("ollama", "missing-model"))
    assert fake.stats()["calls"]["ollama"] == 1


ADAPTERS = [("anthropic", anthropic.AnthropicAdapter), ("ollama", ollama.OllamaAdapter),
            ("gemini", gemini.GeminiAdapter)]


@pytest.mark.parametrize(("kind", "cls"), ADAPTERS, ids=KINDS)
def test_kinds_are_registered(kind, cls):
    assert isinstance(make(kind, "http://127.0.0.1:9"), cls)


# id, method, path, body, what the answer holds
SIDE_ENDPOINTS = [
    ("ollama-root", "GET", "/", None, lambda r: r.text == "Ollama is running"),
    ("ollama-version", "GET", "/api/version", None, lambda r: "version" in r.json()),
    ("ollama-tags", "GET", "/api/tags", None, lambda r: r.json()["models"][0]["name"] == "llama3.2:latest"),
    ("gemini-stream-without-sse-is-one-array", "POST", "/v1beta/models/m:streamGenerateContent",
     {"contents": [{"role": "user", "parts": [{"text": "hi there"}]}]},
     lambda r: [c["candidates"][0].get("finishReason") for c in r.json()] == [None, None, "STOP"]),
    ("gemini-unknown-field-refused", "POST", "/v1beta/models/m:generateContent",
     {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "temperature": 1},
     lambda r: r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"),
    ("anthropic-needs-its-version-header", "POST", "/v1/messages",
     {"model": "m", "max_tokens": 5, "messages": []},
     lambda r: r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]),
]


@pytest.mark.parametrize(("method", "path", "body", "check"), **cases(SIDE_ENDPOINTS))
def test_the_fake_speaks_like_the_real_servers(fake, method, path, body, check):
    headers = {"x-goog-api-key": KEY, "x-api-key": KEY}
    assert check(requests.request(method, fake.url + path, json=body, headers=headers, timeout=5))
