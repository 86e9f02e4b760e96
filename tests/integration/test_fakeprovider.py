"""The fake upstream must look exactly like OpenAI to the official ``openai`` SDK.

One fake process serves the whole module (started once, ~0.5 s); each test resets its state.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import openai
import pytest

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
    r2 = client.embeddings.create(model="fake-embedding", input="alpha", encoding_format="float",
                                  dimensions=8)
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
        client.chat.completions.create(model="fake-model",
                                       messages=[{"role": "user", "content": "status:429"}])
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="fake-model",
                                       messages=[{"role": "user", "content": "status:503 x"}])
    assert info.value.status_code == 503
    assert info.value.body["type"] == "server_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-model",
                                       messages=[{"role": "user", "content": "status:400"}])


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
    r = client.chat.completions.create(model="fake-model",
                                       messages=[{"role": "user", "content": "sleep:0.3 hi"}])
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


# ------------------------------------------------------------------------------ enforced limits
def _ratelimit(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(("x-ratelimit-", "retry-after"))}


def _duration_s(text: str) -> float:
    from workers.adapters.openai import parse_duration  # the gateway must be able to read what the fake sends

    value = parse_duration(text)
    assert value is not None, text
    return value


def _call(client, content: str = "a b c", model: str = "fake-model", **kw):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], **kw)


def test_rpm_limit_gives_real_429s_with_truthful_headers(client, fake):
    fake.configure(limits={"rpm": 3})
    seen = []
    for _ in range(3):
        raw = _call(client)
        seen.append(_ratelimit(raw.headers))
    assert [h["x-ratelimit-limit-requests"] for h in seen] == ["3"] * 3
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    # the oldest call leaves the window 60 s after it started: that is when the quota grows again
    assert all(59 < _duration_s(h["x-ratelimit-reset-requests"]) <= 60 for h in seen)
    assert seen[0]["x-ratelimit-limit-tokens"] == "30000000"  # no tpm limit: the constants
    with pytest.raises(openai.RateLimitError) as info:
        _call(client, "refused")
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "requests"
    assert "requests per min (RPM): Limit 3, Used 3, Requested 1" in err.message
    h = _ratelimit(err.response.headers)
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert 59_000 < int(h["retry-after-ms"]) <= 60_000 and h["retry-after"] == "60"
    assert abs(_duration_s(h["x-ratelimit-reset-requests"]) - int(h["retry-after-ms"]) / 1000) < 0.05
    stats = fake.stats()
    assert stats["rate_limited"] == {"rpm": 1, "tpm": 0, "concurrency": 0}
    assert stats["by_status"] == {"200": 3, "429": 1}
    assert stats["limits"]["*"]["requests"] == 3  # the refused call used no quota
    assert [e[2] for e in fake.timeline()["events"]] == ["ok", "ok", "ok", "rpm"]
    fake.reset()  # back to the command line's limits: none
    assert _call(client).parse().choices[0].message.content == "echo: a b c"
    assert fake.stats()["rate_limited"] == {"rpm": 0, "tpm": 0, "concurrency": 0}


def test_tpm_limit_counts_prompt_and_completion_at_the_start(client, fake):
    fake.configure(limits={"tpm": 20})
    # "a b c": 3 prompt tokens + "echo: a b c" 4 completion tokens = 7
    first = _ratelimit(_call(client).headers)
    assert first["x-ratelimit-limit-tokens"] == "20" and first["x-ratelimit-remaining-tokens"] == "13"
    assert 59 < _duration_s(first["x-ratelimit-reset-tokens"]) <= 60
    assert _ratelimit(_call(client).headers)["x-ratelimit-remaining-tokens"] == "6"
    with pytest.raises(openai.RateLimitError) as info:  # 7 more do not fit in the 6 left
        _call(client)
    assert info.value.type == "tokens"
    assert "tokens per min (TPM): Limit 20, Used 14, Requested 7" in info.value.message
    assert 59_000 < int(info.value.response.headers["retry-after-ms"]) <= 60_000
    assert _ratelimit(_call(client, "x").headers)["x-ratelimit-remaining-tokens"] == "3"  # 1 + 2 fits
    with pytest.raises(openai.RateLimitError) as info:  # larger than the whole TPM: never fits
        _call(client, " ".join(["w"] * 30))
    assert "Request too large" in info.value.message
    with pytest.raises(openai.RateLimitError):  # embeddings count too: 4 tokens > 3 left
        client.embeddings.create(model="fake-embedding", input="one two three four")
    assert fake.stats()["rate_limited"]["tpm"] == 3
    assert fake.stats()["admitted_tokens"] == 17


def test_concurrency_limit_counts_calls_in_flight_and_streams_until_their_end(client, fake):
    from concurrent.futures import ThreadPoolExecutor

    fake.configure(limits={"concurrency": 2})
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(_call, client, "sleep:0.6 slow") for _ in range(2)]
        deadline = time.monotonic() + 5
        while fake.stats()["limits"]["*"]["in_flight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:
            _call(client, "third")
        assert "Too many concurrent requests" in info.value.message
        assert info.value.response.headers["retry-after-ms"] == "1000"
        assert all(f.result().status_code == 200 for f in slow)
    assert _call(client).status_code == 200
    assert fake.stats()["rate_limited"] == {"rpm": 0, "tpm": 0, "concurrency": 1}

    fake.configure(limits={"concurrency": 1}, chunk_delay_ms=100)
    stream = client.chat.completions.create(model="fake-model", stream=True,
                                            messages=[{"role": "user", "content": "one two three"}])
    next(iter(stream))
    with pytest.raises(openai.RateLimitError):  # the open stream holds the only slot
        _call(client)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: one two three"
    assert fake.stats()["limits"]["*"]["in_flight"] == 0
    assert _call(client).status_code == 200


def test_model_limits_are_separate_and_add_to_the_global_ones(client, fake):
    fake.configure(model_limits={"small": {"rpm": 1}}, limits={"rpm": 3})
    # the tightest limit is reported
    assert _ratelimit(_call(client, model="small").headers)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        _call(client, model="small")
    assert _ratelimit(_call(client, model="big").headers)["x-ratelimit-remaining-requests"] == "1"
    assert _call(client, model="big").status_code == 200
    with pytest.raises(openai.RateLimitError):  # the global 3 are spent (the refused call did not count)
        _call(client, model="big")
    cfg = fake.configure(model_limits=None)
    assert cfg["model_limits"] == {} and cfg["limits"] == {"rpm": 3, "tpm": None, "concurrency": None}


def test_bad_limits_config_is_rejected_and_changes_nothing(fake):
    fake.reset()
    for bad in ({"limits": {"rpm": 0}}, {"limits": {"rpd": 5}}, {"limits": {"rpm": "5"}}, {"limits": [1]},
                {"reset_mode": "later", "latency_ms": 500}):
        req = urllib.request.Request(f"{fake.url}/_control/config", data=json.dumps(bad).encode(),
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 400
    cfg = fake.config()
    assert cfg["limits"] == {"rpm": None, "tpm": None, "concurrency": None} and cfg["latency_ms"] == 0


def test_reset_mode_full_reports_until_the_window_is_empty(client, fake):
    fake.configure(limits={"rpm": 5}, reset_mode="full")
    _call(client)
    time.sleep(0.3)
    h = _ratelimit(_call(client).headers)
    assert _duration_s(h["x-ratelimit-reset-requests"]) > 59.9  # the newest call leaves last
    fake.configure(reset_mode="next")
    h = _ratelimit(_call(client).headers)
    assert _duration_s(h["x-ratelimit-reset-requests"]) < 59.8  # the oldest leaves first


def test_sliding_window_arithmetic():
    from tests.fakeprovider import LimitScope, parse_limits

    sc = LimitScope("*", parse_limits({"rpm": 3, "tpm": 100}))
    for t, n in ((0.0, 50), (10.0, 30), (20.0, 10)):
        assert sc.refusals(t, n, 1.0) == []
        sc.admit(t, n)
    assert sc.refusals(30.0, 1, 1.0) == [("rpm", 30.0)]          # the call of t=0 leaves at 60
    assert sc.reset_in("requests", 30.0, "next") == 30.0 and sc.reset_in("requests", 30.0, "full") == 50.0
    sc.prune(59.999)
    assert len(sc.starts) == 3
    sc.prune(60.0)                                                 # (t-60, t]: started at exactly t-60 is out
    assert len(sc.starts) == 2 and sc.token_sum == 40
    assert sc.refusals(60.0, 60, 1.0) == []                        # 40 + 60 = 100 fits
    assert sc.refusals(60.0, 61, 1.0) == [("tpm", 10.0)]           # needs the call of t=10 gone
    sc.admit(60.0, 60)
    assert sc.refusals(61.0, 40, 1.0) == [("rpm", 9.0), ("tpm", 19.0)]  # 100 used: t=10 and t=20 must go
    assert sc.refusals(61.0, 41, 1.0) == [("rpm", 9.0), ("tpm", 59.0)]
    assert sc.refusals(61.0, 101, 1.0) == [("rpm", 9.0), ("tpm", 60.0)]  # larger than the limit


def test_limits_from_the_command_line_survive_reset():
    with FakeProvider(limits={"rpm": 2}, model_limits={"m": {"tpm": 9}}) as fp:
        c = openai.OpenAI(base_url=fp.base_url, api_key="x", max_retries=0, timeout=10)
        _call(c)
        _call(c)
        with pytest.raises(openai.RateLimitError):
            _call(c)
        fp.reset()
        assert fp.config()["limits"]["rpm"] == 2 and fp.config()["model_limits"] == {
            "m": {"rpm": None, "tpm": 9, "concurrency": None}}
        assert _call(c).status_code == 200  # reset forgot the use counted so far
        c.close()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_call_answered_after_a_reset_does_not_count_in_the_new_stats(fake, stream):
    """A call still sleeping when a test ends (e.g. its worker was killed) answers during the next test:
    its answer must not show in that test's stats (status counts, calls in flight)."""
    import threading

    fake.reset()
    body = json.dumps({"model": "gpt-4o-mini", "stream": stream,
                       "messages": [{"role": "user", "content": "sleep:1 a stray"}]}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
    request = urllib.request.Request(fake.base_url + "/chat/completions", data=body, method="POST",
                                     headers=headers)
    stray = threading.Thread(target=lambda: urllib.request.urlopen(request, timeout=10).read())
    stray.start()
    deadline = time.monotonic() + 5
    while fake.stats()["in_flight"] != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.stats()["in_flight"] == 1
    fake.reset()                  # the next test begins
    stray.join()                  # the stray answers
    stats = fake.stats()
    assert stats["by_status"] == {} and stats["in_flight"] == 0, stats
