"""A fake upstream that speaks three native wire formats for real: Anthropic Messages, Ollama's
``/api/chat`` and Gemini's ``generateContent`` — for adapter and end-to-end tests.

Run it::

    python -m tests.fake_native --port 0 [--host 127.0.0.1] [--latency-ms 0] [--api-key SECRET]

It prints one line ``READY <port>`` once it listens. Its root URL is the base URL of all three kinds
(``http://127.0.0.1:<port>``): Anthropic's and Gemini's ``base_url``, Ollama's host. Plain WSGI on
``gevent.pywsgi``, like ``tests.fakeprovider``. From Python::

    with FakeNative() as fake:
        fake.url; fake.configure(fail_next={"count": 1, "status": 529}); fake.requests(); fake.reset()

Endpoints
---------
``POST /v1/messages`` (Anthropic)
    Needs ``x-api-key`` (401 ``authentication_error`` otherwise, or when ``--api-key`` differs) and
    ``anthropic-version`` (400). Validates like the real API: unknown top-level fields, missing
    ``model`` / ``max_tokens``, roles other than user/assistant, image blocks without a supported
    ``media_type``, ``tool_result`` blocks whose ``tool_use_id`` is not in the previous assistant turn,
    tools without ``input_schema`` → 400 ``invalid_request_error``. Answers a Message (content blocks,
    ``stop_reason``, ``usage``); with ``"stream": true`` the full SSE sequence: message_start,
    content_block_start, ping, content_block_delta (text_delta / input_json_delta), content_block_stop,
    message_delta (stop_reason, usage), message_stop. Tool calls come after a short text block (as
    Claude answers), one tool_use block per call; their streamed input is split over several
    ``input_json_delta`` events, the first one empty. Every answer carries ``request-id`` and the
    ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`` headers.
``POST /api/chat`` (Ollama; ``GET /``, ``GET /api/tags``, ``GET /api/version`` too)
    No auth. ``stream`` defaults to TRUE as in Ollama: NDJSON (``application/x-ndjson``), one object per
    word, tool calls whole in one object (arguments as an OBJECT, no ids), then a ``"done": true``
    object with ``done_reason``, ``prompt_eval_count``, ``eval_count`` and durations. Models whose name
    starts with ``missing`` are not pulled: 404 ``{"error": "model \\"…\\" not found, try pulling it
    first"}``. ``images`` must be base64 (400 otherwise).
``POST /v1beta/models/<model>:generateContent`` / ``:streamGenerateContent[?alt=sse]`` (Gemini)
    Key in ``x-goog-api-key`` or ``?key=``: none → 403 PERMISSION_DENIED; a wrong one (``--api-key``)
    → 400 INVALID_ARGUMENT with ErrorInfo reason API_KEY_INVALID and a DebugInfo detail that quotes the
    key, as Google does. Unknown fields (top level, generationConfig, parts), roles other than
    user/model, function responses that do not match the previous turn's calls → 400; ``missing*``
    models → 404 NOT_FOUND. Answers a GenerateContentResponse (candidates, functionCall parts — the
    first with a ``thoughtSignature`` — finishReason, usageMetadata, modelVersion, responseId). With
    ``alt=sse``, SSE events ``data: {…}\\r\\n\\r\\n``, the last one with finishReason and usage; without
    it, one JSON array of the same objects.

Answers (deterministic, the same rules as ``tests.fakeprovider``)
-----------------------------------------------------------------
Text: ``"echo: " + <text of the last user message>``; if the last user turn carries tool results, the
echo of those results (joined by a space). Tokens: ``max(1, words)`` — prompt = words of every text in
the request (system and tool-call arguments included), completion = words of the answer, or for tool
calls the words of ``name + " " + arguments JSON`` per call (plus Anthropic's text block).
Tool calls: when the request has tools (and tool choice is not none) and the last user text contains
the word "weather": one call per place named after "in" (``"weather in Oslo and in Rome"`` → two
parallel calls; none named → "Paris"), to the first tool whose name contains "weather", else the first
tool; arguments fill the tool schema's required properties. Anthropic's
``disable_parallel_tool_use`` keeps only the first call. A max-tokens limit below the answer's word
count truncates it (stop_reason max_tokens / done_reason length / finishReason MAX_TOKENS).

Magic prefixes of the last user text (combinable: ``"sleep:0.2 status:503 hi"``):
``sleep:<s>`` wait first; ``status:<code>`` fail with that status in the format's own error shape
(429 with ``retry-after`` + spent rate-limit headers / RetryInfo; Anthropic 529 overloaded_error);
``drop:`` cut the connection after the first content piece (or half the body when not streaming);
``truncate:`` end the stream cleanly after the first piece, without its terminator;
``fail:`` send the format's mid-stream error after the first piece (Anthropic ``event: error``
overloaded_error, Ollama ``{"error": …}``);
``bad200:`` answer 200 with the format's error body (a 500's), as a broken proxy in front of it would.

Control API (JSON; not authenticated — loopback only)
``POST /_control/config`` partial update of ``latency_ms``, ``chunk_delay_ms`` (between streamed events),
``fail_next`` (``{"count", "status", "retry_after"}``: the next N model calls fail), ``api_key``
(``null``: any key), ``quota_exhausted_s`` (> 0: successful Anthropic answers say the request limit is
spent and resets in that many seconds). ``GET /_control/config``; ``GET /_control/stats`` →
``{"calls": {"anthropic", "ollama", "gemini"}, "by_status", "by_content", "in_flight"}``;
``GET /_control/requests`` → the last 100 model calls ``[{"format", "path", "query", "headers",
"body"}]``; ``POST /_control/reset``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from tests.serverproc import ServerProcess, announce_and_serve

JSON = "application/json"
REQUEST_LOG = 100
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           408: "Request Timeout", 413: "Payload Too Large", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout", 529: "Overloaded"}
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
ANTHROPIC_FIELDS = {"model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k",
                    "stop_sequences", "stream", "tools", "tool_choice", "metadata", "thinking",
                    "service_tier"}
IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
GEMINI_FIELDS = {"contents", "tools", "toolConfig", "safetySettings", "systemInstruction", "generationConfig",
                 "cachedContent"}
GEMINI_GENERATION = {"temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences",
                     "responseMimeType", "responseSchema", "responseJsonSchema", "presencePenalty",
                     "frequencyPenalty", "seed", "responseLogprobs", "logprobs", "thinkingConfig"}
GEMINI_PARTS = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "thought",
                "thoughtSignature"}
OLLAMA_MODELS = ("llama3.2:latest", "qwen3:8b")
MAGIC = re.compile(r"(sleep:(?P<sleep>\d*\.?\d+)|status:(?P<status>\d{3})"
                   r"|(?P<flag>drop|truncate|fail|bad200):)\s*")


def count_tokens(text: str) -> int:
    """The fake's tokenizer: whitespace-separated words, at least 1."""
    return max(1, len(text.split()))


class Invalid(Exception):
    """A request the real API would refuse: (status, message, extra error fields)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class _Drop(Exception):
    """Raised inside a response iterator to cut the connection."""


# ---- what is asked, whatever the format ---------------------------------------------------------------


@dataclass
class Ask:
    texts: list[str] = field(default_factory=list)            # every text of the request, for prompt tokens
    last_user: str = ""                                       # text of the last user message
    tool_results: list[str] = field(default_factory=list)     # results in the last user turn, if any
    tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, JSON schema)
    tools_allowed: bool = True
    parallel: bool = True
    max_tokens: int | None = None


@dataclass
class Answer:
    text: str
    calls: list[tuple[str, dict[str, Any]]]
    truncated: bool
    prompt_tokens: int

    def completion_tokens(self, *, with_text: bool = False) -> int:
        words = sum(count_tokens(f"{name} {json.dumps(args)}") for name, args in self.calls)
        return max(1, words + (count_tokens(self.text) if with_text or not self.calls else 0))


@dataclass
class Magic:
    sleep: float = 0.0
    status: int | None = None
    flags: set[str] = field(default_factory=set)


def read_magic(text: str) -> Magic:
    magic, rest = Magic(), text.lstrip()
    while (match := MAGIC.match(rest)) is not None:
        if match["sleep"]:
            magic.sleep += float(match["sleep"])
        elif match["status"]:
            magic.status = magic.status or int(match["status"])
        else:
            magic.flags.add(match["flag"])
        rest = rest[match.end():]
    return magic


def decide(ask: Ask) -> Answer:
    prompt = max(1, sum(len(t.split()) for t in ask.texts))
    if ask.tools and ask.tools_allowed and not ask.tool_results and re.search(r"\bweather\b", ask.last_user,
                                                                                re.IGNORECASE):
        name, schema = next((t for t in ask.tools if "weather" in t[0].lower()), ask.tools[0])
        places = list(dict.fromkeys(p.strip("?.!,") for p in re.findall(r"\bin\s+([\w-]+)", ask.last_user)))
        places = (places or ["Paris"])[: None if ask.parallel else 1]
        calls = [(name, _arguments(schema, place)) for place in places]
        return Answer("Let me check the weather.", calls, False, prompt)
    text = "echo: " + (" ".join(ask.tool_results) if ask.tool_results else ask.last_user)
    words = re.findall(r"\s*\S+", text)
    if ask.max_tokens is not None and len(words) > ask.max_tokens:
        return Answer("".join(words[: ask.max_tokens]), [], True, prompt)
    return Answer(text, [], False, prompt)


def _arguments(schema: dict[str, Any], place: str) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    args: dict[str, Any] = {}
    for name in schema.get("required") or list(properties) or ["location"]:
        spec = properties.get(name) or {}
        if spec.get("enum"):
            args[name] = spec["enum"][0]
        elif name in ("location", "city", "place"):
            args[name] = place
        else:
            args[name] = {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}.get(
                spec.get("type", "string"), "fake")
    return args


def words_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


# ---- Anthropic Messages ------------------------------------------------------------------------------


def anthropic_ask(body: Any) -> Ask:
    if not isinstance(body, dict):
        raise Invalid(400, "request body must be a JSON object")
    for key in body:
        if key not in ANTHROPIC_FIELDS:
            raise Invalid(400, f"{key}: Extra inputs are not permitted")
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            raise Invalid(400, f"{key}: Field required")
    ask = Ask(max_tokens=int(body["max_tokens"]))
    system = body.get("system")
    ask.texts += [system] if isinstance(system, str) else [b.get("text", "") for b in system or []]
    previous_calls: set[str] = set()
    for i, turn in enumerate(body["messages"]):
        role, content = turn.get("role"), turn.get("content")
        if role not in ("user", "assistant"):
            raise Invalid(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        calls, results, text = set(), [], []
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "text":
                text.append(str(block.get("text", "")))
            elif kind == "image":
                _anthropic_image(block.get("source") or {}, f"messages.{i}.content.{j}")
            elif kind == "tool_use":
                calls.add(str(block.get("id")))
                ask.texts.append(f"{block.get('name')} {json.dumps(block.get('input'))}")
            elif kind == "tool_result":
                if block.get("tool_use_id") not in previous_calls:
                    raise Invalid(400, f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                                  "`tool_result` blocks. Each `tool_result` block must have a corresponding "
                                  "`tool_use` block in the previous message.")
                result = block.get("content")
                results.append(result if isinstance(result, str) else
                               " ".join(b.get("text", "") for b in result or [] if b.get("type") == "text"))
            elif kind != "document":
                raise Invalid(400, f"messages.{i}.content.{j}.type: unknown block type {kind!r}")
        ask.texts += text + results
        previous_calls = calls
        if role == "user":
            ask.last_user, ask.tool_results = " ".join(text), results
    for i, tool in enumerate(body.get("tools") or []):
        if "input_schema" not in tool:
            raise Invalid(400, f"tools.{i}.input_schema: Field required")
        ask.tools.append((str(tool.get("name")), tool["input_schema"]))
    choice = body.get("tool_choice") or {}
    ask.tools_allowed = choice.get("type") != "none"
    ask.parallel = not choice.get("disable_parallel_tool_use")
    return ask


def _anthropic_image(source: dict[str, Any], where: str) -> None:
    if source.get("type") == "url" and source.get("url"):
        return
    if source.get("type") != "base64" or source.get("media_type") not in IMAGE_TYPES:
        raise Invalid(400, f"{where}.source.media_type: Input should be 'image/jpeg', 'image/png', "
                      "'image/gif' or 'image/webp'")
    _base64(source.get("data"), f"{where}.source.data: invalid base64 data")


def _base64(data: Any, problem: str) -> None:
    try:
        base64.b64decode(str(data), validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(400, problem) from None


def anthropic_message(model: str, answer: Answer) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if answer.text:
        content.append({"type": "text", "text": answer.text})
    for name, args in answer.calls:
        content.append({"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": name,
                        "input": args})
    stop = "tool_use" if answer.calls else "max_tokens" if answer.truncated else "end_turn"
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0,
                      "output_tokens": answer.completion_tokens(with_text=True), "service_tier": "standard"}}


def anthropic_events(message: dict[str, Any], magic: Magic) -> Iterator[tuple[str, dict[str, Any]]]:
    """The SSE events of a Message; stops (or fails) after the first delta as ``magic`` commands."""
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**message["usage"], "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": start}
    first_delta = True
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "text", "text": ""}}
            pieces = [{"type": "text_delta", "text": w} for w in words_of(block["text"])]
        else:
            opening = {**block, "input": {}}
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": opening}
            raw = json.dumps(block["input"])
            pieces = [{"type": "input_json_delta", "partial_json": p}
                      for p in ["", *(raw[k:k + 6] for k in range(0, len(raw), 6))]]
        if index == 0:
            yield "ping", {"type": "ping"}
        for piece in pieces:
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": piece}
            if first_delta and (piece.get("text") or piece.get("partial_json")):
                first_delta = False
                if "fail" in magic.flags:
                    overloaded = {"type": "overloaded_error", "message": "Overloaded"}
                    yield "error", {"type": "error", "error": overloaded}
                    return
                if "truncate" in magic.flags:
                    return
                if "drop" in magic.flags:
                    raise _Drop("stream dropped on command")
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                            "usage": {"output_tokens": message["usage"]["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}


def anthropic_error(status: int, message: str | None = None) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    default = {429: "Number of request tokens has exceeded your per-minute rate limit",
               529: "Overloaded", 401: "invalid x-api-key"}.get(status, f"fake error {status}")
    return {"type": "error", "error": {"type": kind, "message": message or default},
            "request_id": "req_" + uuid.uuid4().hex[:24]}


def anthropic_rate_headers(*, spent_for: float = 0.0) -> list[tuple[str, str]]:
    """``anthropic-ratelimit-*`` headers; ``spent_for`` > 0 says the request limit is spent for that long."""
    now = datetime.now(UTC)
    headers = []
    for limit, size in (("requests", 4000), ("tokens", 400000), ("input-tokens", 200000),
                        ("output-tokens", 80000)):
        spent = spent_for > 0 and limit == "requests"
        reset = now + timedelta(seconds=spent_for if spent else 0.5)
        headers += [(f"anthropic-ratelimit-{limit}-limit", str(size)),
                    (f"anthropic-ratelimit-{limit}-remaining", "0" if spent else str(size - 1)),
                    (f"anthropic-ratelimit-{limit}-reset", reset.strftime("%Y-%m-%dT%H:%M:%SZ"))]
    return headers


# ---- Ollama /api/chat --------------------------------------------------------------------------------


def ollama_ask(body: Any) -> Ask:
    if not isinstance(body, dict):
        raise Invalid(400, "invalid request body")
    if not body.get("model"):
        raise Invalid(400, "model is required")
    if str(body["model"]).startswith("missing"):
        raise Invalid(404, f'model "{body["model"]}" not found, try pulling it first')
    options = body.get("options") or {}
    ask = Ask(max_tokens=options.get("num_predict"))
    messages = body.get("messages") or []
    for i, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant", "tool"):
            raise Invalid(400, f"invalid role {message.get('role')!r}")
        for image in message.get("images") or []:
            _base64(image, f"illegal base64 data in messages[{i}].images")
        ask.texts.append(str(message.get("content") or ""))
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            if not isinstance(function.get("arguments"), dict):
                raise Invalid(400, "json: cannot unmarshal string into Go struct field "
                              ".messages.tool_calls.function.arguments of type api.ToolCallFunctionArguments")
            ask.texts.append(f"{function.get('name')} {json.dumps(function['arguments'])}")
    trailing: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        trailing.insert(0, str(message.get("content") or ""))
    ask.tool_results = trailing
    ask.last_user = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"),
                         "")
    functions = [t.get("function") or {} for t in body.get("tools") or []]
    ask.tools = [(str(f.get("name")), f.get("parameters") or {}) for f in functions]
    return ask


def ollama_objects(model: str, answer: Answer, magic: Magic, *, stream: bool) -> Iterator[dict[str, Any]]:
    """The NDJSON objects of an answer (one, the final, when not streaming)."""
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"  # Ollama prints nanoseconds
    calls = [{"function": {"name": name, "arguments": args}} for name, args in answer.calls]
    text = "" if calls else answer.text
    final = {"model": model, "created_at": created, "message": {"role": "assistant", "content": ""},
             "done": True, "done_reason": "length" if answer.truncated else "stop",
             "total_duration": 12_345_678, "load_duration": 1_234_567,
             "prompt_eval_count": answer.prompt_tokens, "prompt_eval_duration": 2_345_678,
             "eval_count": answer.completion_tokens(), "eval_duration": 8_765_432}
    if not stream:
        final["message"] = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        yield final
        return
    pieces = [{"role": "assistant", "content": "", "tool_calls": calls}] if calls else [
        {"role": "assistant", "content": w} for w in words_of(text)]
    for n, message in enumerate(pieces):
        yield {"model": model, "created_at": created, "message": message, "done": False}
        if n == 0 and magic.flags & {"fail", "truncate", "drop"}:
            if "fail" in magic.flags:
                yield {"error": "an error was encountered while running the model: unexpected EOF"}
            if "drop" in magic.flags:
                raise _Drop("stream dropped on command")
            return
    yield final


# ---- Gemini generateContent --------------------------------------------------------------------------


def gemini_ask(body: Any) -> Ask:
    if not isinstance(body, dict):
        raise Invalid(400, "Invalid JSON payload received.")
    for key in body:
        if key not in GEMINI_FIELDS:
            raise Invalid(400, f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
    generation = body.get("generationConfig") or {}
    for key in generation:
        if key not in GEMINI_GENERATION:
            raise Invalid(400, f'Invalid JSON payload received. Unknown name "{key}" at '
                          "'generation_config': Cannot find field.")
    contents = body.get("contents") or []
    if not contents:
        raise Invalid(400, "* GenerateContentRequest.contents: contents is not specified")
    ask = Ask(max_tokens=generation.get("maxOutputTokens"))
    ask.texts += [p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts") or []]
    previous_calls = 0
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            raise Invalid(400, "Please use a valid role: user, model.")
        texts, calls, results = [], 0, []
        for j, part in enumerate(content.get("parts") or []):
            for key in part:
                if key not in GEMINI_PARTS:
                    raise Invalid(400, f'Invalid JSON payload received. Unknown name "{key}" at '
                                  f"'contents[{i}].parts[{j}]': Cannot find field.")
            if "text" in part:
                texts.append(str(part["text"]))
            elif "inlineData" in part:
                inline = part["inlineData"]
                if not inline.get("mimeType"):
                    raise Invalid(400, f"* GenerateContentRequest.contents[{i}].parts[{j}].inline_data"
                                  ".mime_type: mime_type is not specified")
                _base64(inline.get("data"), f"Invalid value at 'contents[{i}].parts[{j}].inline_data.data'")
            elif "functionCall" in part:
                calls += 1
                call = part["functionCall"]
                ask.texts.append(f"{call.get('name')} {json.dumps(call.get('args'))}")
            elif "functionResponse" in part:
                results.append(_response_text(part["functionResponse"].get("response")))
        if results and len(results) != previous_calls:
            raise Invalid(400, "Please ensure that the number of function response parts is equal to the "
                          "number of function call parts of the function call turn.")
        ask.texts += texts + results
        previous_calls = calls
        if content["role"] == "user":
            ask.last_user, ask.tool_results = " ".join(texts), results
    for tool in body.get("tools") or []:
        for declaration in tool.get("functionDeclarations") or []:
            schema = declaration.get("parametersJsonSchema") or declaration.get("parameters") or {}
            ask.tools.append((str(declaration.get("name")), schema))
    mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
    ask.tools_allowed = mode != "NONE"
    return ask


def _response_text(response: Any) -> str:
    """A function response as text: its only string value (``{"output": "sunny"}``), else its JSON."""
    values = list(response.values()) if isinstance(response, dict) else []
    if len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return json.dumps(response, separators=(",", ":"))


def gemini_responses(model: str, answer: Answer, magic: Magic, *, stream: bool) -> Iterator[dict[str, Any]]:
    """The GenerateContentResponse objects of an answer (one when not streaming)."""
    response_id = uuid.uuid4().hex[:20]
    calls: list[dict[str, Any]] = [{"functionCall": {"name": name, "args": args}}
                                   for name, args in answer.calls]
    if calls:
        calls[0]["thoughtSignature"] = base64.b64encode(b"fake thought " + response_id.encode()).decode()
    completion = answer.completion_tokens()
    usage = {"promptTokenCount": answer.prompt_tokens, "candidatesTokenCount": completion,
             "totalTokenCount": answer.prompt_tokens + completion,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": answer.prompt_tokens}]}

    def response(parts: list[dict[str, Any]], finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
                "responseId": response_id}

    finish = "MAX_TOKENS" if answer.truncated else "STOP"
    if not stream:
        yield response(calls or [{"text": answer.text}], finish, usage)
        return
    partial = {"promptTokenCount": answer.prompt_tokens, "totalTokenCount": answer.prompt_tokens}
    if calls:
        yield response(calls, finish, usage)
        return
    pieces = words_of(answer.text)
    for n, piece in enumerate(pieces):
        last = n == len(pieces) - 1
        yield response([{"text": piece}], finish if last else None, usage if last else partial)
        if n == 0 and not last and magic.flags & {"truncate", "drop"}:
            if "drop" in magic.flags:
                raise _Drop("stream dropped on command")
            return


def google_error(status: int, message: str | None = None, *, retry_after: float = 1.0) -> dict[str, Any]:
    defaults = {429: "You exceeded your current quota, please check your plan and billing details.",
                500: "An internal error has occurred. Please retry or report in "
                     "https://developers.generativeai.google/guide/troubleshooting",
                503: "The model is overloaded. Please try again later."}
    error: dict[str, Any] = {"code": status, "status": GOOGLE_STATUS.get(status, "UNKNOWN"),
                             "message": message or defaults.get(status, f"fake error {status}")}
    if status == 429:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                 "quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}]
    return {"error": error}


def google_key_invalid(key: str) -> dict[str, Any]:
    """Google's answer to a wrong key: 400, and a DebugInfo detail that quotes the key back."""
    body = google_error(400, "API key not valid. Please pass a valid API key.")
    body["error"]["details"] = [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.DebugInfo", "detail": f"Invalid API key: {key}"}]
    return body


# ---- the WSGI application ----------------------------------------------------------------------------


StartResponse = Callable[..., Any]


class FakeNativeApp:
    """One instance per process; greenlets share its state."""

    def __init__(self, latency_ms: float = 0.0, api_key: str | None = None) -> None:
        self.default_latency_ms, self.default_api_key = float(latency_ms), api_key
        self.in_flight = 0  # a gauge, not a statistic: reset leaves it alone (calls may still be running)
        self.reset()

    def reset(self) -> None:
        self.latency_ms, self.chunk_delay_ms = self.default_latency_ms, 0.0
        self.api_key = self.default_api_key
        self.fail_next: dict[str, Any] = {"count": 0}
        self.quota_exhausted_s = 0.0
        self.calls = {"anthropic": 0, "ollama": 0, "gemini": 0}
        self.by_status: dict[str, int] = {}
        self.by_content: dict[str, int] = {}
        self.request_log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG)

    def config(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "chunk_delay_ms": self.chunk_delay_ms,
                "fail_next": dict(self.fail_next), "api_key": self.api_key,
                "quota_exhausted_s": self.quota_exhausted_s}

    def apply_config(self, cfg: dict[str, Any]) -> None:
        if "latency_ms" in cfg:
            latency = cfg["latency_ms"]
            self.latency_ms = self.default_latency_ms if latency is None else float(latency)
        if "chunk_delay_ms" in cfg:
            self.chunk_delay_ms = float(cfg["chunk_delay_ms"] or 0)
        if "fail_next" in cfg:
            self.fail_next = {"count": 0, **(cfg["fail_next"] or {})}
        if "api_key" in cfg:
            self.api_key = cfg["api_key"]
        if "quota_exhausted_s" in cfg:
            self.quota_exhausted_s = float(cfg["quota_exhausted_s"] or 0)

    def stats(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "by_status": dict(self.by_status),
                "by_content": dict(self.by_content), "in_flight": self.in_flight}

    # ---------------------------------------------------------------- routing
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/_control/"):
            return self._control(environ, start_response, path[len("/_control/"):], method)
        if method == "POST" and path == "/v1/messages":
            return self._model_call(environ, start_response, "anthropic", "")
        if method == "POST" and path == "/api/chat":
            return self._model_call(environ, start_response, "ollama", "")
        match = re.fullmatch(r"/v1beta/models/([^/:]+):(generateContent|streamGenerateContent)", path)
        if method == "POST" and match:
            streaming = match[2] == "streamGenerateContent"
            return self._model_call(environ, start_response, "gemini", match[1], stream=streaming)
        if method in ("GET", "HEAD") and path == "/":
            return self._send(start_response, 200, b"Ollama is running", [("Content-Type", "text/plain")])
        if method == "GET" and path == "/api/version":
            return self._json(start_response, 200, {"version": "0.12.6"})
        if method == "GET" and path == "/api/tags":
            models = [{"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z", "size": 2019393189,
                       "digest": uuid.uuid5(uuid.NAMESPACE_URL, m).hex,
                       "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B",
                                   "quantization_level": "Q4_K_M"}} for m in OLLAMA_MODELS]
            return self._json(start_response, 200, {"models": models})
        return self._send(start_response, 404, b"404 page not found", [("Content-Type", "text/plain")])

    def _control(self, environ: dict[str, Any], start_response: StartResponse, name: str,
                 method: str) -> Iterable[bytes]:
        if name == "config" and method == "POST":
            self.apply_config(json.loads(_read(environ) or b"{}"))
        if name == "config":
            return self._json(start_response, 200, self.config())
        if name == "stats":
            return self._json(start_response, 200, self.stats())
        if name == "requests":
            return self._json(start_response, 200, list(self.request_log))
        if name == "reset" and method == "POST":
            self.reset()
            return self._json(start_response, 200, {"ok": True})
        return self._json(start_response, 404, {"error": f"no control endpoint {method} {name}"})

    # ---------------------------------------------------------------- model calls
    def _model_call(self, environ: dict[str, Any], start_response: StartResponse, fmt: str, model: str, *,
                    stream: bool = False) -> Iterable[bytes]:
        self.calls[fmt] += 1
        self.in_flight += 1
        handed_off = False
        try:
            raw = _read(environ)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                       if k.startswith("HTTP_")}
            self.request_log.append({"format": fmt, "path": environ.get("PATH_INFO"), "query": query,
                                     "headers": headers, "body": body})
            refusal = self._refuse(fmt, headers, query)
            if refusal is not None:
                return self._json(start_response, refusal[0], refusal[1])
            if fmt == "gemini" and model.startswith("missing"):
                return self._error(start_response, fmt, 404, f"models/{model} is not found for API version "
                                   "v1beta, or is not supported for generateContent.")
            try:
                ask = {"anthropic": anthropic_ask, "ollama": ollama_ask, "gemini": gemini_ask}[fmt](body)
            except Invalid as exc:
                return self._error(start_response, fmt, exc.status, exc.message)
            self.by_content[ask.last_user] = self.by_content.get(ask.last_user, 0) + 1
            magic = read_magic(ask.last_user)
            _sleep(magic.sleep + self.latency_ms / 1000)
            if self.fail_next.get("count", 0) > 0:
                self.fail_next["count"] -= 1
                return self._error(start_response, fmt, int(self.fail_next.get("status") or 429), None,
                                   float(self.fail_next.get("retry_after") or 1))
            if magic.status:
                return self._error(start_response, fmt, magic.status)
            if "bad200" in magic.flags:
                return self._json(start_response, 200, self._error_body(fmt, 500, None, 1.0)[0])
            answer = decide(ask)
            if fmt == "anthropic":
                model, stream = str(body["model"]), bool(body.get("stream"))
            elif fmt == "ollama":
                model, stream = str(body["model"]), body.get("stream", True) is not False
            sse = fmt == "anthropic" or query.get("alt") == "sse"
            response, handed_off = self._answer(start_response, fmt, model, answer, magic, stream=stream,
                                                sse=sse)
            return response
        finally:
            if not handed_off:
                self.in_flight -= 1

    def _refuse(self, fmt: str, headers: dict[str, str], query: dict[str, str]) -> tuple[int, Any] | None:
        """(status, error body) when the credentials or required headers are wrong."""
        if fmt == "anthropic":
            key = headers.get("x-api-key")
            if not key:
                return 401, anthropic_error(401, "x-api-key header is required")
            if self.api_key is not None and key != self.api_key:
                return 401, anthropic_error(401, "invalid x-api-key")
            if not headers.get("anthropic-version"):
                return 400, anthropic_error(400, "anthropic-version: header is required")
        if fmt == "gemini":
            key = headers.get("x-goog-api-key") or query.get("key")
            if not key:
                return 403, google_error(403, "Method doesn't allow unregistered callers (callers without "
                                         "established identity). Please use API Key or other form of API "
                                         "consumer identity to call this API.")
            if self.api_key is not None and key != self.api_key:
                return 400, google_key_invalid(key)
        return None

    def _answer(self, start_response: StartResponse, fmt: str, model: str, answer: Answer, magic: Magic, *,
                stream: bool, sse: bool) -> tuple[Iterable[bytes], bool]:
        """The response body, and whether it is a relay (which settles ``in_flight`` when it ends)."""
        extra = self._anthropic_headers() if fmt == "anthropic" else []
        drop = "drop" in magic.flags
        events: Iterator[Any]
        encode: Callable[[Any], bytes]
        if fmt == "anthropic":
            message = anthropic_message(model, answer)
            if not stream:
                return self._json(start_response, 200, message, extra, drop=drop), False
            events, encode = anthropic_events(message, magic), _sse_named
        elif fmt == "ollama":
            events, encode = ollama_objects(model, answer, magic, stream=stream), _ndjson
        else:
            events, encode = gemini_responses(model, answer, magic, stream=stream), _sse_data
            if stream and not sse:  # streamGenerateContent without alt=sse: one JSON array
                return self._json(start_response, 200, list(events)), False
        if not stream:
            return self._json(start_response, 200, next(events), drop=drop), False
        content_type = "application/x-ndjson" if fmt == "ollama" else "text/event-stream; charset=utf-8"
        self._count(200)
        start_response("200 OK", [("Content-Type", content_type), ("Cache-Control", "no-cache"), *extra])
        return self._relay(events, encode), True

    def _relay(self, events: Iterator[Any], encode: Callable[[Any], bytes]) -> Iterator[bytes]:
        try:
            for n, event in enumerate(events):
                if n:
                    _sleep(self.chunk_delay_ms / 1000)
                yield encode(event)
        finally:
            self.in_flight -= 1

    def _anthropic_headers(self) -> list[tuple[str, str]]:
        return [("request-id", "req_" + uuid.uuid4().hex[:24]), ("anthropic-organization-id", "fake-org"),
                *anthropic_rate_headers(spent_for=self.quota_exhausted_s)]

    # ---------------------------------------------------------------- responses
    def _error(self, start_response: StartResponse, fmt: str, status: int, message: str | None = None,
               retry_after: float = 1.0) -> Iterable[bytes]:
        body, headers = self._error_body(fmt, status, message, retry_after)
        return self._json(start_response, status, body, headers)

    @staticmethod
    def _error_body(fmt: str, status: int, message: str | None,
                    retry_after: float) -> tuple[Any, list[tuple[str, str]]]:
        """The format's error body for ``status``, and the headers that go with it."""
        headers: list[tuple[str, str]] = []
        if fmt == "anthropic":
            body = anthropic_error(status, message)
            headers = [("request-id", "req_" + uuid.uuid4().hex[:24])]
            if status == 429:
                headers += [("retry-after", f"{retry_after:g}"), ("x-should-retry", "true"),
                            *anthropic_rate_headers(spent_for=retry_after)]
        elif fmt == "ollama":
            body = {"error": message or f"fake error {status}"}
            if status == 429:
                headers = [("Retry-After", f"{retry_after:g}")]
        else:
            body = google_error(status, message, retry_after=retry_after)
        return body, headers

    def _json(self, start_response: StartResponse, status: int, obj: Any,
              headers: list[tuple[str, str]] | None = None, *, drop: bool = False) -> Iterable[bytes]:
        headers = headers or []
        payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        if drop:  # promise the whole body, send half of it, cut the connection
            self._count(status)
            start_response(f"{status} {REASONS.get(status, 'Error')}",
                           [("Content-Type", JSON), ("Content-Length", str(len(payload))), *headers])
            return _dropping(payload[: len(payload) // 2])
        return self._send(start_response, status, payload, [("Content-Type", JSON), *headers])

    def _send(self, start_response: StartResponse, status: int, payload: bytes,
              headers: list[tuple[str, str]]) -> list[bytes]:
        self._count(status)
        start_response(f"{status} {REASONS.get(status, 'Error')}",
                       [*headers, ("Content-Length", str(len(payload)))])
        return [payload]

    def _count(self, status: int) -> None:
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1


def _read(environ: dict[str, Any]) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return environ["wsgi.input"].read(length) if length else environ["wsgi.input"].read()


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)  # monkey-patched: a gevent sleep


def _sse_named(event: tuple[str, dict[str, Any]]) -> bytes:
    name, data = event
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _sse_data(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\r\n\r\n"


def _ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def _dropping(piece: bytes) -> Iterator[bytes]:
    yield piece
    raise _Drop("connection dropped on command")


# ---- server and test helper ----------------------------------------------------------------------------


def serve(host: str, port: int, latency_ms: float, api_key: str | None = None) -> None:
    from gevent import monkey

    monkey.patch_all()
    import logging
    import socket

    from gevent.pywsgi import WSGIHandler, WSGIServer

    class QuietHandler(WSGIHandler):
        def handle(self) -> Any:
            with contextlib.suppress(OSError):  # no Nagle delay between headers and body
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return super().handle()

        def log_request(self) -> None:
            pass

        def handle_error(self, t: Any, v: Any, tb: Any) -> None:
            if isinstance(v, _Drop):  # commanded cut: close the socket, no 500
                self.close_connection = True
                self.response_use_chunked = False
                with contextlib.suppress(Exception):
                    self.socket.shutdown(2)
                return
            super().handle_error(t, v, tb)

    server = WSGIServer((host, port), FakeNativeApp(latency_ms, api_key), handler_class=QuietHandler,
                        log=None, error_log=logging.getLogger("fake_native"))
    server.init_socket()
    announce_and_serve(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_native",
                                     description="Fake Anthropic / Ollama / Gemini upstream (see the "
                                                 "docstring).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default=None, help="require exactly this key (default: any)")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.latency_ms, args.api_key)
    return 0


class FakeNative(ServerProcess):
    """Runs ``python -m tests.fake_native`` as a subprocess on a free port (a context manager)."""

    module = "tests.fake_native"

    def __init__(self, latency_ms: float = 0.0, *, host: str = "127.0.0.1", api_key: str | None = None,
                 startup_timeout: float = 20.0) -> None:
        super().__init__(host=host, startup_timeout=startup_timeout)
        self.latency_ms, self.api_key = latency_ms, api_key

    def arguments(self) -> list[str]:
        return ["--latency-ms", str(self.latency_ms), *(["--api-key", self.api_key] if self.api_key else [])]

    @property
    def url(self) -> str:
        """The base URL of all three formats (Anthropic / Gemini ``base_url``, Ollama host)."""
        return f"http://{self.host}:{self.port}"

    def _control(self, method: str, name: str, payload: Any = None) -> Any:
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.url}/_control/{name}", data=data, method=method,
                                         headers={"Content-Type": JSON})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def configure(self, **config: Any) -> dict[str, Any]:
        return self._control("POST", "config", config)

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "stats")

    def requests(self) -> list[dict[str, Any]]:
        return self._control("GET", "requests")

    def reset(self) -> None:
        self._control("POST", "reset", {})


if __name__ == "__main__":
    sys.exit(main())
