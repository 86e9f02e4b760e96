"""The official google-genai SDK, unchanged, against the gateway's Gemini routes (OpenAI-format upstream
``tests.fakeprovider``; real workers, real API)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from google import genai
from google.genai import errors, types

from tests.integration.conftest import ROOT, Api, wait_until

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
WEATHER = types.Tool(function_declarations=[types.FunctionDeclaration(
    name="get_weather", description="Weather in a city", parameters_json_schema=SCHEMA)])
HELLO = {"contents": [{"role": "user", "parts": [{"text": "hello raw"}]}]}


def client_for(url: str, api_key: str = "anything", version: str = "v1beta",
               headers: dict[str, str] | None = None,
               client_args: dict[str, Any] | None = None) -> genai.Client:
    """A client; close it (``with``) before the API stops: its keep-alive connections would hold the
    API's graceful shutdown."""
    return genai.Client(api_key=api_key, http_options=types.HttpOptions(
        base_url=url, api_version=version, headers=headers, timeout=30_000, client_args=client_args))


@pytest.fixture
def clients() -> Iterator[Callable[..., genai.Client]]:
    made: list[genai.Client] = []

    def make(*args: Any, **kwargs: Any) -> genai.Client:
        made.append(client_for(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def gem(api, clients) -> genai.Client:
    return clients(api.url)


def ask_gemini(url: str, model: str, text: str, *, streamed: bool, tools: bool,
               image: str | None = None) -> dict[str, Any]:
    """One call through the SDK; the answer normalised as ``test_matrix.ask`` does: text, calls, finish."""
    parts = [types.Part.from_bytes(data=base64.b64decode(image), mime_type="image/png")] if image else []
    contents = [types.Content(role="user", parts=[*parts, types.Part.from_text(text=text)])]
    config = types.GenerateContentConfig(tools=[WEATHER] if tools else None)
    with client_for(url) as client:
        if streamed:
            responses = list(client.models.generate_content_stream(model=model, contents=contents,
                                                                   config=config))
        else:
            responses = [client.models.generate_content(model=model, contents=contents, config=config)]
    calls = [(call.name, call.args) for r in responses for call in r.function_calls or []]
    finish = responses[-1].candidates[0].finish_reason
    return {"text": "".join(r.text or "" for r in responses) or None, "calls": calls,
            "finish": "tool_calls" if calls else {types.FinishReason.STOP: "stop"}.get(finish, finish)}


def test_text_with_system_instruction_and_generation_config(gem, fake):
    config = types.GenerateContentConfig(system_instruction="be brief", max_output_tokens=100,
                                         temperature=0.5)
    reply = gem.models.generate_content(model="fake-model", contents="hello gemini", config=config)
    assert reply.text == "echo: hello gemini"
    assert reply.candidates[0].finish_reason == types.FinishReason.STOP
    assert reply.usage_metadata.candidates_token_count == 3
    assert reply.model_version == "fake-model"
    sent = fake.requests()[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["max_tokens"] == 100 and sent["temperature"] == 0.5
    headers = reply.sdk_http_response.headers
    assert headers["x-gateway-job-id"] and headers["x-gateway-provider"] == "fake"
    assert headers["x-gateway-model"] == "fake-model" and headers["x-gateway-queue-wait-ms"]


def test_default_sdk_version_v1_is_served_too(api, fake, clients):
    client = clients(api.url, version="v1")
    assert client.models.generate_content(model="fake-model", contents="via v1").text == "echo: via v1"


def test_stream_over_sse(gem, fake):
    chunks = list(gem.models.generate_content_stream(model="fake-model", contents="stream to gemini"))
    assert "".join(c.text or "" for c in chunks) == "echo: stream to gemini"
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.candidates_token_count == 4
    assert chunks[0].sdk_http_response.headers["x-gateway-job-id"]
    assert fake.requests()[-1]["body"]["stream"] is True


def test_stream_kept_alive_while_in_line_reaches_the_sdk_whole(api, fake, clients, start_worker):
    committed = threading.Event()  # the response's headers went out with its first keep-alive
    gem = clients(api.url, client_args={"event_hooks": {"response": [lambda response: committed.set()]}})
    with ThreadPoolExecutor(1) as pool:  # nothing serves llm.stalled yet: the call waits in line
        chunks = pool.submit(lambda: list(gem.models.generate_content_stream(model="stalled-model",
                                                                            contents="worth the wait")))
        wait_until(committed.is_set, 20)
        start_worker("stalled")
        assert "".join(c.text or "" for c in chunks.result(timeout=30)) == "echo: worth the wait"


def test_stream_without_alt_sse_is_one_json_array(api, fake):
    url = f"{api.url}/v1beta/models/fake-model:streamGenerateContent"
    r = requests.post(url, json=HELLO, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    responses = json.loads(r.text)
    assert isinstance(responses, list) and len(responses) >= 2
    assert "".join(p.get("text", "") for resp in responses
                   for p in resp["candidates"][0]["content"]["parts"]) == "echo: hello raw"
    assert responses[-1]["candidates"][0]["finishReason"] == "STOP"
    sse = requests.post(url, params={"alt": "sse"}, json=HELLO, timeout=30)
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert [e["candidates"][0]["content"]["parts"] for e in events] == [
        resp["candidates"][0]["content"]["parts"] for resp in responses]


@pytest.mark.parametrize("streamed", [False, True], ids=["non-stream", "stream"])
def test_function_call_and_its_response(gem, fake, streamed):
    config = types.GenerateContentConfig(tools=[WEATHER])
    question = types.Content(role="user", parts=[types.Part.from_text(text="what is the weather in Oslo")])
    if streamed:
        chunks = list(gem.models.generate_content_stream(model="fake-model", contents=[question],
                                                         config=config))
        calls = [call for c in chunks for call in c.function_calls or []]
        model_turn = types.Content(role="model", parts=[types.Part(function_call=call) for call in calls])
    else:
        reply = gem.models.generate_content(model="fake-model", contents=[question], config=config)
        calls, model_turn = reply.function_calls, reply.candidates[0].content
    assert [(c.name, c.args) for c in calls] == [("get_weather", {"location": "Oslo"})]
    assert fake.requests()[-1]["body"]["tools"][0]["function"]["parameters"] == SCHEMA
    answer = types.Content(role="user", parts=[
        types.Part.from_function_response(name="get_weather", response={"forecast": "sunny"})])
    reply = gem.models.generate_content(model="fake-model", contents=[question, model_turn, answer],
                                        config=config)
    assert reply.text == 'echo: {"forecast": "sunny"}'
    tool_message = fake.requests()[-1]["body"]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == calls[0].id


def test_count_tokens_and_models(gem):
    assert gem.models.count_tokens(model="fake-model", contents="how many tokens is this").total_tokens > 0
    names = {m.name for m in gem.models.list()}
    assert "models/fake-model" in names and "models/nokey-model" not in names  # nokey: not routable
    model = gem.models.get(model="fake-model")
    assert model.name == "models/fake-model" and "generateContent" in model.supported_actions


def test_errors_in_googles_shape(gem, api):
    with pytest.raises(errors.ClientError) as err:
        gem.models.generate_content(model="no-such-model", contents="x")
    assert err.value.code == 404 and err.value.status == "NOT_FOUND" and "no-such-model" in err.value.message
    with pytest.raises(errors.ClientError) as err:
        gem.models.generate_content_stream(model="no-such-model", contents="x").__next__()
    assert err.value.code == 404
    with pytest.raises(errors.ClientError) as err:
        gem.models.generate_content(model="fake-model", contents="x", config=types.GenerateContentConfig(
            tools=[types.Tool(google_search=types.GoogleSearch())]))
    assert err.value.code == 400 and err.value.status == "INVALID_ARGUMENT"
    assert "googleSearch" in err.value.message
    assert err.value.details["error"]["details"][0]["fieldViolations"][0]["field"] == "tools.0"
    for method, path, body, status in [
            ("post", "/v1beta/models/fake-model:generateContent", b"{bad", 400),
            ("post", "/v1beta/models/fake-model:generateContent", b"", 400),
            ("get", "/v1beta/files", None, 404),
            ("get", "/v1beta/models/fake-model:generateContent", None, 404)]:
        r = getattr(requests, method)(f"{api.url}{path}", data=body, timeout=10)
        assert r.status_code == status, (path, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] == status, r.text


def test_max_wait_header_expires_a_queued_call_as_resource_exhausted(api, clients):
    stalled = clients(api.url, headers={"x-gateway-max-wait": "1"})  # nothing serves llm.stalled
    with pytest.raises(errors.ClientError) as err:
        stalled.models.generate_content(model="stalled-model", contents="never sent")
    assert err.value.code == 429 and err.value.status == "RESOURCE_EXHAUSTED"
    assert int(err.value.response.headers["retry-after"]) >= 1


@pytest.fixture(scope="module")
def secured_api(gateway_env, workers, tmp_path_factory):
    server = Api({**gateway_env, "GATEWAY_AUTH": "required"},
                 tmp_path_factory.mktemp("gemini-secured") / "api.log").start()
    yield server
    server.stop()


def test_keys_as_google_sends_them(secured_api, gateway_env, fake, clients):
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "keys", "create", "--name", "gemini"],
                         cwd=ROOT, env=gateway_env, check=True, capture_output=True, text=True).stdout
    secret = out.strip().splitlines()[-1]
    keyed = clients(secured_api.url, api_key=secret)  # the SDK sends x-goog-api-key
    assert keyed.models.generate_content(model="fake-model", contents="keyed").text == "echo: keyed"
    url = f"{secured_api.url}/v1beta/models/fake-model:generateContent"
    assert requests.post(url, params={"key": secret}, json=HELLO, timeout=30).status_code == 200
    bearer = requests.post(url, headers={"Authorization": f"Bearer {secret}"}, json=HELLO, timeout=30)
    assert bearer.status_code == 200
    wrong = clients(secured_api.url, api_key="sk-gw-wrong")
    with pytest.raises(errors.ClientError) as err:
        wrong.models.generate_content(model="fake-model", contents="x")
    assert err.value.code == 401 and err.value.status == "UNAUTHENTICATED"
    missing = requests.post(url, json=HELLO, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["status"] == "UNAUTHENTICATED"
    assert secret not in missing.text
    # ?key= belongs to the Gemini routes only: other protocols never take keys from URLs
    openai_call = requests.post(f"{secured_api.url}/v1/chat/completions", params={"key": secret}, timeout=30,
                                json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
    assert openai_call.status_code == 401
