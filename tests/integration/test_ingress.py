"""The official anthropic and ollama SDKs, unchanged, against the gateway (OpenAI-format upstream)."""

from __future__ import annotations

import base64

import anthropic
import ollama
import pytest
import requests

pytestmark = pytest.mark.integration

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                            "required": ["location"]}}
PIXEL = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                       "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")).decode()


@pytest.fixture
def claude(api) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.url, api_key="anything", max_retries=0)


@pytest.fixture
def llama(api) -> ollama.Client:
    return ollama.Client(host=api.url)


def test_anthropic_message(claude, fake):
    message = claude.messages.create(model="fake-model", max_tokens=100, system="be brief",
                                     messages=[{"role": "user", "content": "hello claude"}])
    assert message.content[0].text == "echo: hello claude"
    assert message.stop_reason == "end_turn" and message.role == "assistant"
    assert message.usage.output_tokens == 3
    sent = fake.requests()[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"} and sent["max_tokens"] == 100


def test_anthropic_stream(claude, fake):
    with claude.messages.stream(model="fake-model", max_tokens=100,
                                messages=[{"role": "user", "content": "stream to claude"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: stream to claude" and final.stop_reason == "end_turn"


@pytest.mark.parametrize("streamed", [False, True], ids=["non-stream", "stream"])
def test_anthropic_tool_use(claude, fake, streamed):
    kwargs = {"model": "fake-model", "max_tokens": 100, "tools": [WEATHER],
              "messages": [{"role": "user", "content": "what is the weather in Oslo"}]}
    if streamed:
        with claude.messages.stream(**kwargs) as stream:
            message = stream.get_final_message()
    else:
        message = claude.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    use = next(block for block in message.content if block.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"location": "Oslo"}
    # and the tool result goes back the Anthropic way
    reply = claude.messages.create(model="fake-model", max_tokens=100, tools=[WEATHER], messages=[
        kwargs["messages"][0], {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert reply.content[0].text == "echo: sunny"


def test_anthropic_image_reaches_upstream_as_image_url(claude, fake):
    claude.messages.create(model="fake-model", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "text", "text": "what is this"}]}])
    parts = fake.requests()[-1]["body"]["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}} in parts


def test_anthropic_errors_in_anthropics_shape(claude, api):
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=10,
                               messages=[{"role": "user", "content": "x"}])
    r = requests.post(f"{api.url}/v1/messages",
                      json={"model": "fake-model", "messages": "nope", "max_tokens": 5})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    counted = claude.messages.count_tokens(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens > 0


def test_ollama_chat_and_stream(llama, fake):
    reply = llama.chat(model="fake-model", messages=[{"role": "user", "content": "hello llama"}])
    assert reply.message.content == "echo: hello llama" and reply.done and reply.eval_count == 3
    parts = list(llama.chat(model="fake-model", messages=[{"role": "user", "content": "stream llama"}],
                            stream=True))
    assert "".join(p.message.content for p in parts) == "echo: stream llama"
    assert parts[-1].done and parts[-1].done_reason == "stop"


@pytest.mark.parametrize("streamed", [False, True], ids=["non-stream", "stream"])
def test_ollama_tool_call(llama, fake, streamed):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": WEATHER["input_schema"]}}]
    result = llama.chat(model="fake-model", tools=tools, stream=streamed,
                        messages=[{"role": "user", "content": "weather in Oslo please"}])
    parts = list(result) if streamed else [result]
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert dict(calls[0].function.arguments) == {"location": "Oslo"}


def test_ollama_generate_tags_show_version(llama, api, fake):
    assert llama.generate(model="fake-model", prompt="generate this").response == "echo: generate this"
    assert "fake-model" in {m.model for m in llama.list().models}
    assert llama.show("fake-model").capabilities[0] == "completion"
    assert requests.get(f"{api.url}/api/version").json()["version"]


def test_ollama_errors_in_ollamas_shape(llama, api):
    with pytest.raises(ollama.ResponseError) as err:
        llama.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=False)
    assert err.value.status_code == 404 and "no-such-model" in err.value.error
    r = requests.post(f"{api.url}/api/chat", data=b"{bad")
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_openai_embeddings_through_the_queue(api, fake, db):
    import openai

    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x", max_retries=0)
    result = client.embeddings.create(model="fake-model", input=["first text", "second one here"])
    assert [len(d.embedding) for d in result.data] == [8, 8] and result.usage.prompt_tokens == 5
    assert fake.stats()["embeddings_calls"] == 1
    r = requests.post(f"{api.url}/v1/embeddings", json={"model": "fake-model", "input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_ollama_embed(llama, fake):
    result = llama.embed(model="fake-model", input=["a b", "c"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 8
