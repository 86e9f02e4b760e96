"""Virtual models through the real API, workers and two fake upstreams: ``cheap``, ``fast`` and
``auto`` pick what the table says, capabilities rule candidates out, overrides work (and never reach
the upstream), every answer says what happened, and all three ingress protocols accept ``auto``.

Registry: ``tiny`` (small, cheapest, no tools) and ``big`` (large, dearest, everything) on the ``slow``
fake (300 ms before each answer); ``mid`` (medium, tools + json, no vision) on the fast ``fake``;
``ghost`` (cheap, everything) on a provider without credentials — never chosen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
import requests

from tests.conftest import TEST_REDIS_URL
from tests.fakeprovider import FakeProvider
from tests.integration.conftest import Process, WorkerFactory, kill_all

SLOW_MS = 300
REGISTRY = """
providers:
  fake: {kind: openai, base_url: FAST_URL, api_key_env: FAKE_API_KEY, max_retries: 1, timeout: 30}
  slow: {kind: openai, base_url: SLOW_URL, api_key_env: FAKE_API_KEY, max_retries: 1, timeout: 30}
  nokey: {kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: GATEWAY_TEST_UNSET_KEY}
models:
  tiny: {provider: slow, model: fake-model, tier: small, context_window: 8192,
         capabilities: [chat, stream], price: {input: 0.1, output: 0.2}}
  mid: {provider: fake, model: fake-model, tier: medium, context_window: 32768,
        capabilities: [chat, tools, json, stream], price: {input: 1, output: 2}}
  big: {provider: slow, model: fake-model, tier: large, context_window: 128000,
        capabilities: [chat, tools, vision, json, stream], price: {input: 10, output: 30}}
  duo: {deployments: [{provider: fake, model: fake-model}, {provider: slow, model: fake-model}],
        tier: medium, context_window: 32768, capabilities: [chat, stream], price: {input: 100, output: 100}}
  ghost: {provider: nokey, model: fake-model, tier: small, context_window: 128000,
          capabilities: [chat, tools, vision, json, stream], price: {input: 0, output: 0}}
virtual_models:
  auto: {strategy: balanced}
  fast: {strategy: fastest}
  cheap: {strategy: cheapest}
  textonly: {strategy: cheapest, candidates: [tiny, mid]}
  pair: {strategy: quality, candidates: [tiny, duo]}
"""
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}, "required": ["city"]}}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
CODE = "```python\ndef add(a, b):\n    return a - b\n```"


@pytest.fixture(scope="module")
def slow_fake() -> Iterator[FakeProvider]:
    with FakeProvider(latency_ms=SLOW_MS) as provider:
        yield provider


@pytest.fixture(scope="module")
def gateway_env(gateway_env: dict[str, str], fake: FakeProvider, slow_fake: FakeProvider,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    config = tmp_path_factory.mktemp("virtual") / "registry.yaml"
    config.write_text(REGISTRY.replace("FAST_URL", fake.base_url).replace("SLOW_URL", slow_fake.base_url))
    return {**gateway_env, "GATEWAY_CONFIG": str(config)}


@pytest.fixture(scope="module")
def slow_worker(worker_factory: WorkerFactory) -> Iterator[Process]:
    proc = worker_factory.start("slow", "slow1")
    yield proc
    kill_all([proc])


@pytest.fixture
def url(api, slow_worker) -> str:
    return api.url


def chat(url: str, model: str, content: object = "hi", *, headers: dict | None = None,
         **extra: object) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=30)


def decision(response: requests.Response) -> dict[str, str]:
    raw = response.headers["x-gateway-routing-decision"]
    return dict(part.split("=", 1) for part in raw.split("; "))


def test_models_lists_the_virtual_models(url):
    data = {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert {"auto", "fast", "cheap", "textonly"} <= set(data)
    assert data["cheap"]["virtual"] is True and data["cheap"]["strategy"] == "cheapest"
    assert set(data["auto"]["candidates"]) == {"tiny", "mid", "big", "duo"}  # ghost's provider has no key
    one = requests.get(f"{url}/v1/models/fast", timeout=10).json()
    assert (one["id"], one["virtual"], one["strategy"]) == ("fast", True, "fastest")


ROUTES = [
    # id, model, content, extra body, expected alias, expected tier
    ("cheap-plain", "cheap", "hello there", {}, "tiny", "small"),
    ("cheap-tools-skips-tiny", "cheap", "weather in Oslo?", {"tools": [TOOL]}, "mid", "small"),
    ("cheap-vision-only-big", "cheap", [{"type": "text", "text": "what is it?"}, IMAGE], {}, "big", "small"),
    ("auto-simple", "auto", "What is the capital of France?", {}, "tiny", "small"),
    ("auto-code", "auto", f"What does this do?\n{CODE}", {}, "mid", "medium"),
    ("auto-hard", "auto", f"Debug this and explain why it fails, step by step:\n{CODE}", {}, "big", "large"),
    ("auto-json-skips-tiny", "auto", "hello", {"response_format": {"type": "json_object"}}, "mid", "small"),
]


@pytest.mark.parametrize("model,content,extra,alias,tier", [r[1:] for r in ROUTES],
                         ids=[r[0] for r in ROUTES])
def test_virtual_models_pick_what_the_table_says(url, model, content, extra, alias, tier):
    r = chat(url, model, content, **extra)
    assert r.status_code == 200, r.text
    said = decision(r)
    assert (said["virtual"], said["alias"], said["tier"]) == (model, alias, tier)
    provider = "fake" if alias == "mid" else "slow"
    assert r.headers["x-gateway-provider"] == provider  # the job really ran where the decision says
    record = r.json()["x-gateway"]["routing_decision"]
    assert (record["alias"], record["virtual_model"], record["tier"]) == (alias, model, tier)
    assert record["skipped"]["ghost"] == "provider nokey not configured"


def ttft(prefix: str) -> dict[str, float]:
    raw = redis.Redis.from_url(TEST_REDIS_URL).hgetall(f"{prefix}:routing:ttft")
    return {k.decode(): float(v.split()[0]) for k, v in raw.items()}


def test_fast_follows_measured_time_to_first_token(url, fake, slow_fake, prefix):
    for alias in ("tiny", "mid", "tiny", "mid"):  # measured through the real workers
        assert chat(url, alias).status_code == 200
    measured = ttft(prefix)
    assert measured["tiny"] >= SLOW_MS * 0.8 and measured["mid"] < SLOW_MS / 2, measured
    r = chat(url, "fast")
    assert decision(r)["alias"] == "mid" and r.headers["x-gateway-provider"] == "fake"
    # the fakes trade places: the averages follow, and so does `fast`
    fake.configure(latency_ms=3 * SLOW_MS)
    slow_fake.configure(latency_ms=0)
    try:
        for alias in ("mid", "tiny", "big") * 4:
            assert chat(url, alias).status_code == 200
        measured = ttft(prefix)
        assert measured["mid"] > measured["tiny"], measured
        r = chat(url, "fast")
        assert decision(r)["alias"] in ("tiny", "big") and r.headers["x-gateway-provider"] == "slow"
        streamed = chat(url, "fast", stream=True)  # a stream is decided (and tagged) the same way
        assert streamed.status_code == 200 and decision(streamed)["alias"] in ("tiny", "big")
        assert "data: [DONE]" in streamed.text
    finally:
        slow_fake.configure(latency_ms=None)


def test_overrides_as_headers_and_body_fields(url, fake):
    r = chat(url, "auto", "What is the capital of France?", headers={"x-routing-strategy": "quality"})
    assert r.status_code == 200 and decision(r)["alias"] == "big"
    assert decision(r)["strategy"] == "quality"
    r = chat(url, "cheap", "hello", **{"x-prefer-provider": "fake", "x-routing-strategy": "cost"})
    assert r.status_code == 200, r.text
    said = decision(r)
    assert (said["alias"], said["prefer"], said["strategy"]) == ("mid", "fake", "cost")
    sent = fake.requests()[-1]["body"]  # the fields are ours: the upstream never saw them
    assert "x-prefer-provider" not in sent and "x-routing-strategy" not in sent
    r = chat(url, "textonly", [{"type": "text", "text": "x"}, IMAGE], headers={"x-prefer-provider": "fake"})
    assert r.status_code == 400


BAD = [
    ("strategy-header", {"x-routing-strategy": "fanciest"}, {}, "x-routing-strategy"),
    ("provider-body", {}, {"x-prefer-provider": "elsewhere"}, "x-prefer-provider"),
]


@pytest.mark.parametrize("headers,body,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_overrides_are_400_in_each_protocol(url, headers, body, field):
    r = chat(url, "auto", headers=headers, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    a = requests.post(f"{url}/v1/messages", headers=headers, timeout=30, json={
        "model": "auto", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], **body})
    assert a.status_code == 400 and a.json()["type"] == "error" and field in a.json()["error"]["message"]
    o = requests.post(f"{url}/api/chat", headers=headers, timeout=30, json={
        "model": "auto", "stream": False, "messages": [{"role": "user", "content": "hi"}], **body})
    assert o.status_code == 400 and field in o.json()["error"]


def test_nothing_eligible_is_a_400_naming_what_is_missing(url):
    r = chat(url, "textonly", [{"type": "text", "text": "what is it?"}, IMAGE])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "no_eligible_model" and error["param"] == "model"
    assert "tiny lacks vision" in error["message"] and "mid lacks vision" in error["message"]


def test_every_ingress_accepts_auto(url):
    """OpenAI is every other test here; Anthropic, Ollama (whole and streamed) and Gemini."""
    a = requests.post(f"{url}/v1/messages", timeout=30, json={
        "model": "auto", "max_tokens": 50, "messages": [{"role": "user", "content": "What is 2 + 2?"}]})
    assert a.status_code == 200, a.text
    assert a.json()["content"][0]["text"] == "echo: What is 2 + 2?"
    assert decision(a)["virtual"] == "auto" and decision(a)["alias"] == "tiny"
    o = requests.post(f"{url}/api/chat", timeout=30, json={
        "model": "auto", "stream": False, "messages": [{"role": "user", "content": f"Explain:\n{CODE}"}]})
    assert o.status_code == 200, o.text
    assert o.json()["message"]["content"].startswith("echo: Explain:")
    assert decision(o)["alias"] == "mid" and o.headers["x-gateway-provider"] == "fake"
    streamed = requests.post(f"{url}/api/chat", timeout=30, json={
        "model": "auto", "messages": [{"role": "user", "content": "hi"}]})  # Ollama streams by default
    assert streamed.status_code == 200 and decision(streamed)["alias"] == "tiny"
    assert json.loads(streamed.text.splitlines()[-1])["done"] is True
    gemini = requests.post(f"{url}/v1beta/models/auto:generateContent", timeout=30, json={
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert gemini.status_code == 200, gemini.text
    assert decision(gemini)["alias"] == "tiny" and gemini.headers["x-gateway-provider"] == "slow"


def test_an_alias_with_deployments_tells_both_decisions(url):
    """auto → an alias (ours), then which of its deployments serves it (routing's), in one header."""
    r = chat(url, "pair", "hello")
    assert r.status_code == 200, r.text
    raw = r.headers["x-gateway-routing-decision"]
    said = decision(r)
    assert (said["virtual"], said["alias"], said["strategy"]) == ("pair", "duo", "quality")
    assert "; then=" in raw and said["then"], raw
    record = r.json()["x-gateway"]["routing_decision"]
    assert record["alias"] == "duo" and record["then"] == said["then"]
    assert r.headers["x-gateway-deployment"] in ("fake/fake-model", "slow/fake-model")


def test_token_counts_of_a_virtual_model_are_for_the_alias_it_resolves_to(url):
    a = requests.post(f"{url}/v1/messages/count_tokens", timeout=30, json={
        "model": "auto", "messages": [{"role": "user", "content": "hello there"}]})
    assert a.status_code == 200 and a.json()["input_tokens"] > 0, a.text
    assert decision(a)["alias"] == "tiny"
    g = requests.post(f"{url}/v1beta/models/cheap:countTokens", timeout=30, json={
        "contents": [{"role": "user", "parts": [{"text": "hello there"}]}]})
    assert g.status_code == 200 and g.json()["totalTokens"] > 0, g.text
    assert decision(g)["alias"] == "tiny"
