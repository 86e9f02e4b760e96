"""Every ingress format × every native egress format, through the real gateway: text, stream, a tool
call (non-streamed and streamed) and an image. The clients are the official SDKs; the upstreams are
``FakeNative`` speaking Anthropic, Ollama and Gemini for real. (OpenAI-format upstreams are covered
by test_chat_completions / test_streaming / test_ingress.)"""

from __future__ import annotations

import base64
import json
from typing import Any

import anthropic
import ollama
import openai
import pytest

from tests.integration.test_egress_native import (  # noqa: F401 (fixtures)
    ROUTES,
    native,
    native_api,
    native_env,
    refusing_url,
)
from tests.integration.test_gemini_ingress import ask_gemini

pytestmark = pytest.mark.integration

INGRESS = ("openai", "anthropic", "ollama", "gemini")
EGRESS = tuple(ROUTES)
CASES = ("text", "stream", "tool", "tool-stream", "image")
PIXEL = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                       "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")).decode()
SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}


def ask(ingress: str, url: str, model: str, case: str) -> dict[str, Any]:
    """One call in the ingress's own format; the answer normalised to text / tool calls / finish."""
    streamed = case in ("stream", "tool-stream")
    tools = case.startswith("tool")
    text = "what is the weather in Oslo" if tools else "describe this" if case == "image" else f"say {case}"
    if ingress == "gemini":
        image = PIXEL if case == "image" else None
        return ask_gemini(url, model, text, streamed=streamed, tools=tools, image=image)
    if ingress == "openai":
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        content: Any = ([{"type": "text", "text": text},
                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]
                        if case == "image" else text)
        kwargs: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
        if tools:
            kwargs["tools"] = [{"type": "function",
                                "function": {"name": "get_weather", "parameters": SCHEMA}}]
        if not streamed:
            message = client.chat.completions.create(**kwargs).choices[0]
            calls = [(c.function.name, json.loads(c.function.arguments))
                     for c in message.message.tool_calls or []]
            return {"text": message.message.content, "calls": calls, "finish": message.finish_reason}
        out, args, names, finish = "", {}, {}, None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                out += choice.delta.content or ""
                for call in choice.delta.tool_calls or []:
                    names[call.index] = names.get(call.index, "") + (call.function.name or "")
                    args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
                finish = choice.finish_reason or finish
        return {"text": out or None, "calls": [(names[i], json.loads(args[i])) for i in sorted(names)],
                "finish": finish}
    if ingress == "anthropic":
        client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=30)
        image = {"type": "base64", "media_type": "image/png", "data": PIXEL}
        blocks: Any = ([{"type": "image", "source": image}, {"type": "text", "text": text}]
                       if case == "image" else text)
        kwargs = {"model": model, "max_tokens": 200, "messages": [{"role": "user", "content": blocks}]}
        if tools:
            kwargs["tools"] = [{"name": "get_weather", "input_schema": SCHEMA}]
        if streamed:
            with client.messages.stream(**kwargs) as stream:
                message = stream.get_final_message()
        else:
            message = client.messages.create(**kwargs)
        texts = "".join(b.text for b in message.content if b.type == "text")
        calls = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
        return {"text": texts or None, "calls": calls,
                "finish": {"end_turn": "stop", "tool_use": "tool_calls"}.get(message.stop_reason,
                                                                             message.stop_reason)}
    client = ollama.Client(host=url, timeout=30)
    turn: dict[str, Any] = {"role": "user", "content": text}
    if case == "image":
        turn["images"] = [PIXEL]
    kwargs = {"model": model, "messages": [turn], "stream": streamed}
    if tools:
        kwargs["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
    parts = list(client.chat(**kwargs)) if streamed else [client.chat(**kwargs)]
    calls = [(c.function.name, dict(c.function.arguments))
             for p in parts for c in (p.message.tool_calls or [])]
    return {"text": "".join(p.message.content or "" for p in parts) or None, "calls": calls,
            "finish": "tool_calls" if calls else parts[-1].done_reason}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("egress", EGRESS)
@pytest.mark.parametrize("ingress", INGRESS)
def test_pair(native_api, native, ingress, egress, case):  # noqa: F811
    alias = ROUTES[egress][0]
    native.reset()
    answer = ask(ingress, native_api.url, alias, case)
    [seen] = native.requests()
    assert seen["format"] == egress
    if case.startswith("tool"):
        assert answer["calls"] == [("get_weather", {"location": "Oslo"})]
        assert answer["finish"] == "tool_calls"
        return
    expected = {"image": "echo: describe this"}.get(case, f"echo: say {case}")
    assert answer["text"] == expected and answer["calls"] == []
    assert answer["finish"] == "stop"
    if case == "image":
        assert PIXEL in json.dumps(seen["body"])  # the image reached the upstream in its own format
