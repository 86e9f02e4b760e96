"""The fake upstream must look exactly like OpenAI to the official ``openai`` SDK.

One fake process serves the whole module (started once, ~0.5 s); each test resets its state.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from tests.fakeprovider import FakeProvider, count_tokens, embedding_vector

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a place",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                       "required": ["location"]},
    },
}


@pytest.fixture(scope="module")
def fake():
    with FakeProvider() as fp:
        yield fp


@pytest.fixture()
def client(fake):
    fake.reset()
    c = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=10)
    yield c
    c.close()


def test_non_streaming_completion(client, fake):
    r = client.chat.completions.create(model="fake-model",
                                       messages=[{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hello there world"}])
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "fake-model"
    assert r.system_fingerprint
    assert isinstance(r.created, int)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: hello there world"
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == 2 + 3
    assert r.usage.completion_tokens == 4
    assert r.usage.total_tokens == 9
    stats = fake.stats()
    assert stats["calls"] == 1 and stats["by_content"] == {"hello there world": 1}
    assert stats["in_flight"] == 0 and stats["concurrent_max"] == 1
    logged = fake.requests()[-1]
    assert logged["headers"]["authorization"] == "Bearer x"
    assert logged["body"]["model"] == "fake-model"


def test_raw_headers_look_like_openai(client):
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-request-id"].startswith("req_")
    assert int(raw.headers["x-ratelimit-remaining-requests"]) > 0
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.parse().choices[0].message.content == "echo: hi"


def test_stream_with_include_usage(client):
    chunks = list(client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "one two three"}],
        stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices for c in chunks)


def test_tool_call_non_streaming(client):
    r = client.chat.completions.create(
        model="fake-model", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Oslo"}

    # the tool result goes back: the fake answers with text now
    r2 = client.chat.completions.create(
        model="fake-model", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "What is the weather in Oslo?"},
                  choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == "echo: sunny"


def test_tool_call_streaming(client):
    chunks = list(client.chat.completions.create(
        model="fake-model", tools=[WEATHER_TOOL], stream=True,
        messages=[{"role": "user", "content": "weather in Lima please"}]))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) >= 3  # header + several argument pieces
    assert all(d.index == 0 for d in deltas)
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.id is None for d in deltas[1:])
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == {"location": "Lima"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_gives_text(client):
    r = client.chat.completions.create(model="fake-model", tools=[WEATHER_TOOL], tool_choice="none",
                                       messages=[{"role": "user", "content": "weather?"}])
    assert r.choices[0].message.content == "echo: weather?"


def test_max_tokens_truncates(client):
    r = client.chat.completions.create(model="fake-model", max_tokens=2,
                                       messages=[{"role": "user", "content": "a b c d"}])
    assert r.choices[0].message.content == "echo: a"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2


def test_embeddings_float_and_base64(client):
    r = client.embeddings.create(model="fake-embedding", input=["alpha", "beta gamma"])  # SDK asks base64
    assert r.object == "list" and r.model == "fake-embedding"
    assert [d.index for d in r.data] == [0, 1]
    assert r.data[0].embedding == pytest.approx(embedding_vector("alpha"), abs=1e-6)
    assert math.isclose(sum(v * v for v in r.data[1].embedding), 1.0, rel_tol=1e-5)
    assert r.usage.prompt_tokens == 3 and r.usage.total_tokens == 3
    r2 = client.embeddings.create(model="fake-embedding", input="alpha", encoding_format="float", dimensions=8)
    assert r2.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)


def test_models_list(client):
    models = client.models.list()
    ids = [m.id for m in models]
    assert "fake-model" in ids
    assert all(m.object == "model" for m in models.data)
    assert client.models.retrieve("fake-model").id == "fake-model"


def test_rate_limit_is_rate_limit_error(client, fake):
    fake.configure(fail_next={"count": 1, "status": 429, "retry_after": 2})
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.response.headers["retry-after"] == "2"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.response.headers["x-ratelimit-reset-requests"] == "2s"
    # only the next call failed
    r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "echo: hi"
    assert fake.stats()["by_status"] == {"429": 1, "200": 1}


def test_magic_status_and_server_errors(client):
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "status:429"}])
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "status:503 x"}])
    assert info.value.status_code == 503
    assert info.value.body["type"] == "server_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "status:400"}])


def test_missing_or_wrong_key_is_401(fake):
    fake.reset()
    req = urllib.request.Request(f"{fake.base_url}/chat/completions", method="POST",
                                 data=b'{"model":"m","messages":[{"role":"user","content":"x"}]}')
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 401
    assert json.loads(info.value.read())["error"]["type"] == "invalid_request_error"
    fake.configure(api_key="right")
    try:
        bad = openai.OpenAI(base_url=fake.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        good = openai.OpenAI(base_url=fake.base_url, api_key="right", max_retries=0)
        assert good.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).choices
    finally:
        fake.reset()


def test_sleep_magic_latency_and_hang(client, fake):
    t0 = time.monotonic()
    r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "sleep:0.3 hi"}])
    assert time.monotonic() - t0 >= 0.3
    assert r.choices[0].message.content == "echo: sleep:0.3 hi"
    fake.configure(latency_ms=200)
    t0 = time.monotonic()
    client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 >= 0.2
    fake.configure(latency_ms=None, hang_next={"count": 1, "seconds": 0.3})
    t0 = time.monotonic()
    client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 < 0.2


def test_drop_cuts_the_connection(client):
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "drop: x"}])
    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(model="fake-model", stream=True,
                                            messages=[{"role": "user", "content": "drop: a b c"}]))


def test_token_counting_rule():
    assert count_tokens("") == 1
    assert count_tokens("  a  b\tc\n") == 3
