"""OpenAI clients through the real gateway to providers that speak Anthropic, Ollama and Gemini.

The openai SDK → API → llm.<provider> queue → a real Celery worker per provider → its native adapter →
``FakeNative``, which speaks each wire format for real. The Ollama provider's first host refuses
connections, so every Ollama call also goes through failover to its second host.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.fake_native import FakeNative
from tests.integration.conftest import Api, WorkerFactory, kill_all, wait_until

pytestmark = pytest.mark.integration

KEY = "sk-native-upstream-key"
# gateway alias, provider, the provider's model name
ROUTES = {"anthropic": ("claude-native", "nat-anthropic", "claude-sonnet-4-5"),
          "ollama": ("llama-native", "nat-ollama", "llama3.2"),
          "gemini": ("gemini-native", "nat-gemini", "gemini-2.5-flash")}
KINDS = tuple(ROUTES)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a place",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}
PREAMBLE = {"anthropic": "Let me check the weather.", "ollama": None, "gemini": None}


@pytest.fixture(scope="module")
def refusing_url() -> Iterator[str]:
    """A local port that refuses connections: bound, never listening, and held for the module so that
    no other process can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def native() -> Iterator[FakeNative]:
    with FakeNative(api_key=KEY) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_native(native: FakeNative) -> None:
    native.reset()


@pytest.fixture(scope="module")
def native_env(gateway_env: dict[str, str], native: FakeNative, refusing_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The module's environment with a registry of native providers."""
    config = tmp_path_factory.mktemp("native") / "registry.yaml"
    config.write_text(f"""\
providers:
  nat-anthropic: {{kind: anthropic, base_url: "{native.url}", api_key_env: NATIVE_ANTHROPIC_KEY, pool: 8,
                  max_retries: 1, timeout: 30}}
  nat-ollama: {{kind: ollama, base_url: "{refusing_url}", fallback_base_urls: ["{native.url}"],
               requires_key: false, pool: 8, max_retries: 1, timeout: 30}}
  nat-gemini: {{kind: gemini, base_url: "{native.url}", api_key_env: NATIVE_GEMINI_KEY, pool: 8,
               max_retries: 1, timeout: 30}}
models:
  claude-native: {{provider: nat-anthropic, model: claude-sonnet-4-5, max_output_tokens: 2048}}
  llama-native: {{provider: nat-ollama, model: llama3.2}}
  llama-unpulled: {{provider: nat-ollama, model: missing-llama}}
  gemini-native: {{provider: nat-gemini, model: gemini-2.5-flash}}
""")
    return {**gateway_env, "GATEWAY_CONFIG": str(config),
            "NATIVE_ANTHROPIC_KEY": KEY, "NATIVE_GEMINI_KEY": KEY}


@pytest.fixture(scope="module")
def native_api(native_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    logs = tmp_path_factory.mktemp("native-logs")
    providers = [provider for _, provider, _ in ROUTES.values()]
    workers = WorkerFactory(native_env, logs).start_many([(provider, provider) for provider in providers])
    server = Api(native_env, logs / "api.log").start()
    yield server
    server.kill()
    kill_all(workers)


@pytest.fixture(scope="module")
def sdk(native_api: Api) -> Iterator[openai.OpenAI]:
    """One client for the module, closed before the API stops (its keep-alive connections would hold
    the API's graceful shutdown for its whole timeout)."""
    with openai.OpenAI(base_url=f"{native_api.url}/v1", api_key="anything", max_retries=0,
                       timeout=30) as client:
        yield client


def read_stream(stream: Any) -> dict[str, Any]:
    text, calls, finish, usage = "", {}, None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"text": text or None, "calls": calls, "finish": finish, "usage": usage}


@pytest.mark.parametrize("kind", KINDS)
def test_text(sdk, native, db, kind):
    alias, provider, upstream_model = ROUTES[kind]
    raw = sdk.chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": f"hello from {kind}"}])
    reply = raw.parse()
    assert reply.choices[0].message.content == f"echo: hello from {kind}"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 4)
    assert raw.headers["x-gateway-provider"] == provider
    [seen] = native.requests()
    assert seen["format"] == kind
    if kind == "anthropic":
        assert seen["headers"]["x-api-key"] == KEY and seen["body"]["system"] == "be brief"
        assert (seen["body"]["model"], seen["body"]["max_tokens"]) == (upstream_model, 2048)
    elif kind == "gemini":
        assert seen["headers"]["x-goog-api-key"] == KEY
        assert seen["path"] == f"/v1beta/models/{upstream_model}:generateContent"
    else:
        assert (seen["body"]["model"], seen["body"]["stream"]) == (upstream_model, False)

    def usage_row() -> list[tuple[Any, ...]]:
        return db.execute("SELECT provider, provider_model, prompt_tokens, completion_tokens, outcome "
                          "FROM usage WHERE job_id = %s", (raw.headers["x-gateway-job-id"],)).fetchall()
    wait_until(usage_row, 10)
    assert usage_row() == [(provider, upstream_model, 5, 4, "success")]


@pytest.mark.parametrize("kind", KINDS)
def test_stream(sdk, kind):
    stream = sdk.chat.completions.create(
        model=ROUTES[kind][0], stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream these five words please"}])
    got = read_stream(stream)
    assert got["text"] == "echo: stream these five words please" and got["finish"] == "stop"
    assert (got["usage"].prompt_tokens, got["usage"].completion_tokens) == (5, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_tool_calls(sdk, kind):
    reply = sdk.chat.completions.create(
        model=ROUTES[kind][0], tools=[WEATHER],
        messages=[{"role": "user", "content": "what is the weather in Oslo and in Rome"}])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == PREAMBLE[kind]
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"location": "Oslo"}), ("get_weather", {"location": "Rome"})]
    assert all(c.type == "function" and c.id for c in calls) and calls[0].id != calls[1].id
    assert reply.usage.completion_tokens == 6 + (len(PREAMBLE[kind].split()) if PREAMBLE[kind] else 0)

    # the results go back as tool messages; the upstream sees them in its own format and answers
    follow_up = sdk.chat.completions.create(
        model=ROUTES[kind][0], tools=[WEATHER],
        messages=[{"role": "user", "content": "what is the weather in Oslo and in Rome"},
                  choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
                  {"role": "tool", "tool_call_id": calls[1].id, "content": "rainy"}])
    assert follow_up.choices[0].message.content == "echo: sunny rainy"


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_parallel_tool_calls(sdk, kind):
    stream = sdk.chat.completions.create(
        model=ROUTES[kind][0], tools=[WEATHER], stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "what is the weather in Oslo and in Rome"}])
    got = read_stream(stream)
    assert got["finish"] == "tool_calls" and got["text"] == PREAMBLE[kind]
    assert sorted(got["calls"]) == [0, 1]
    assert [(got["calls"][i]["name"], json.loads(got["calls"][i]["arguments"])) for i in (0, 1)] == [
        ("get_weather", {"location": "Oslo"}), ("get_weather", {"location": "Rome"})]
    assert got["calls"][0]["id"] and got["calls"][0]["id"] != got["calls"][1]["id"]
    assert got["usage"].completion_tokens == 6 + (len(PREAMBLE[kind].split()) if PREAMBLE[kind] else 0)


# id, model alias, user text, SDK error, text in its message
ERRORS = [
    ("ollama-model-not-pulled", "llama-unpulled", "hi", openai.NotFoundError, "try pulling it first"),
    ("anthropic-400", "claude-native", "status:400 hi", openai.BadRequestError, "fake error 400"),
    ("gemini-400", "gemini-native", "status:400 hi", openai.BadRequestError, "fake error 400"),
]


@pytest.mark.parametrize(("alias", "text", "error", "message"),
                         [row[1:] for row in ERRORS], ids=[row[0] for row in ERRORS])
def test_upstream_refusals_reach_the_client(sdk, alias, text, error, message):
    with pytest.raises(error) as caught:
        sdk.chat.completions.create(model=alias, messages=[{"role": "user", "content": text}])
    assert message in str(caught.value)
