"""Anthropic Messages API ⇄ canonical (OpenAI Chat Completions). Pure functions, no I/O.

Ingress (a client speaks Anthropic to the gateway): :func:`parse_request`, :func:`render_response`,
:func:`render_error`, :class:`StreamRenderer`. Egress (the gateway calls Anthropic): :func:`to_upstream`,
:func:`from_upstream`, :class:`UpstreamStreamMapper`, :func:`upstream_error_message`.

What maps to what
  system (string or text blocks)        ⇄ a leading system message
  text / image (base64, url) blocks     ⇄ text / image_url parts (base64 ⇄ ``data:`` URL)
  document (base64 PDF, plain text)     ⇄ file part with a ``data:`` URL / text part
  assistant tool_use {id, name, input}  ⇄ assistant tool_calls (input object ⇄ arguments JSON string)
  user tool_result {tool_use_id}        ⇄ role "tool" messages with tool_call_id
  tools {name, description, input_schema} ⇄ tools[].function {name, description, parameters}
  tool_choice auto | any | tool | none  ⇄ "auto" | "required" | {"function": {name}} | "none";
    disable_parallel_tool_use           ⇄ parallel_tool_calls: false
  stop_sequences ⇄ stop; metadata.user_id ⇄ user; max_tokens, temperature, top_p, stream as they are
  stop_reason end_turn, stop_sequence, pause_turn → stop; max_tokens → length; tool_use → tool_calls;
    refusal → content_filter (and back: stop → end_turn, length → max_tokens, …)
  usage input_tokens + cache_creation_input_tokens + cache_read_input_tokens ⇄ prompt_tokens, with
    cache reads ⇄ prompt_tokens_details.cached_tokens; output_tokens ⇄ completion_tokens

Lossy choices
  * max_tokens is required by Anthropic: a canonical request without one is sent with
    ``DEFAULT_MAX_TOKENS`` (4096, which every Claude model accepts).
  * temperature: canonical allows 0–2, Anthropic 0–1; values above 1 are sent as 1.
  * response_format: Anthropic has no JSON mode. We append an instruction to the system prompt (with
    the schema for ``json_schema``); the reply is likely, not guaranteed, to be JSON.
  * System and developer messages anywhere in the conversation are hoisted into ``system``.
  * Dropped on ingress: top_k, thinking, cache_control, service_tier, tool_result ``is_error``, citations;
    thinking blocks in requests and replies. Dropped on egress: OpenAI-only knobs (seed, penalties,
    logprobs, …). ``n`` > 1, audio input and file ids are rejected with InvalidRequest.
  * OpenAI does not say *which* stop sequence matched: "stop" renders as end_turn, stop_sequence null.
  * Tool arguments that are not a JSON object become ``{"_raw_arguments": "<text>"}``.
  * Images inside a tool_result move to a user message right after the tool results (OpenAI tool
    messages carry text only).
"""

from __future__ import annotations

import json
from typing import Any

from common.errors import (
    InvalidRequest,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from common.protocols import shared as s
from common.types import ChatRequest, ChatResponse, Message

DEFAULT_MAX_TOKENS = 4096

STOP_REASON_TO_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
                         "max_tokens": "length", "model_context_window_exceeded": "length",
                         "tool_use": "tool_calls", "refusal": "content_filter"}
FINISH_TO_STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                         "function_call": "tool_use", "content_filter": "refusal"}
STATUS_TO_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                        403: "permission_error",
                        404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                        500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
TOOL_CHOICE_IN = {"auto": "auto", "any": "required", "none": "none"}
TOOL_CHOICE_OUT = {"auto": "auto", "required": "any", "none": "none"}

Event = tuple[str, dict[str, Any]]

# ---- ingress: Anthropic request → canonical -----------------------------------------------------------


def parse_request(body: Any) -> ChatRequest:
    """Validate an Anthropic Messages body and translate it. Raises InvalidRequest naming the
    Anthropic parameter at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    payload: dict[str, Any] = {
        "model": s.field(body, "model", str, "model", required=True),
        "max_tokens": s.number(body.get("max_tokens"), "max_tokens", 1),
        "stream": bool(s.field(body, "stream", bool, "stream")),
    }
    if payload["max_tokens"] is None:
        raise InvalidRequest("missing required parameter: 'max_tokens'", param="max_tokens",
                             code="missing_required_parameter")
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": _system_text(body["system"])})
    turns = s.objects(s.field(body, "messages", list, "messages", required=True), "messages")
    if not turns:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    for i, turn in enumerate(turns):
        messages.extend(_canonical_messages(turn, f"messages.{i}"))
    payload["messages"] = messages
    for key in ("temperature", "top_p"):
        payload[key] = s.number(body.get(key), key, 0, 1)
    if body.get("stop_sequences") is not None:
        payload["stop"] = s.strings(body["stop_sequences"], "stop_sequences")
    if body.get("tools") is not None:
        payload["tools"] = [_canonical_tool(t, f"tools.{i}")
                            for i, t in enumerate(s.objects(body["tools"], "tools"))]
    if body.get("tool_choice") is not None:
        payload.update(_canonical_tool_choice(s.field(body, "tool_choice", dict, "tool_choice")))
    metadata = s.field(body, "metadata", dict, "metadata") or {}
    payload["user"] = s.field(metadata, "user_id", str, "metadata.user_id")
    return s.canonical_request({k: v for k, v in payload.items() if v is not None})


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    blocks = s.objects(system, "system")
    for i, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest("system blocks must be text blocks", param=f"system.{i}")
    return "\n\n".join(block["text"] for block in blocks)


def _canonical_messages(turn: dict[str, Any], param: str) -> list[dict[str, Any]]:
    role = s.field(turn, "role", str, f"{param}.role", required=True)
    if role not in ("user", "assistant"):
        raise s.invalid(f"{param}.role", "must be 'user' or 'assistant'")
    content = s.field(turn, "content", (str, list), f"{param}.content", required=True)
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = s.objects(content, f"{param}.content")
    return _assistant_message(blocks, param) if role == "assistant" else _user_messages(blocks, param)


def _assistant_message(blocks: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    text, calls = [], []
    for i, block in enumerate(blocks):
        where, kind = f"{param}.content.{i}", block.get("type")
        if kind == "text":
            text.append(s.field(block, "text", str, f"{where}.text", required=True))
        elif kind == "tool_use":
            arguments = s.arguments_string(s.field(block, "input", dict, f"{where}.input"))
            calls.append(s.tool_call(s.field(block, "id", str, f"{where}.id", required=True),
                                     s.field(block, "name", str, f"{where}.name", required=True), arguments))
        elif kind not in ("thinking", "redacted_thinking"):
            raise s.unsupported(f"an assistant content block of type {kind!r}", f"{where}.type")
    return [s.assistant_message("".join(text), calls)]


def _user_messages(blocks: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """Tool results first (OpenAI wants them right after the assistant's calls), then the rest."""
    tool_messages: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        where = f"{param}.content.{i}"
        if block.get("type") == "tool_result":
            text, images = _tool_result_content(block.get("content"), f"{where}.content")
            tool_messages.append({"role": "tool", "content": text, "tool_call_id": s.field(
                block, "tool_use_id", str, f"{where}.tool_use_id", required=True)})
            tool_images += images
        else:
            parts.append(_canonical_part(block, where))
    parts = tool_images + parts
    return tool_messages + ([{"role": "user", "content": parts}] if parts else [])


def _tool_result_content(content: Any, param: str) -> tuple[str, list[dict[str, Any]]]:
    if content is None or isinstance(content, str):
        return content or "", []
    parts = [_canonical_part(block, f"{param}.{i}") for i, block in enumerate(s.objects(content, param))]
    return s.part_text(parts, "\n"), [p for p in parts if p["type"] != "text"]


def _canonical_part(block: dict[str, Any], param: str) -> dict[str, Any]:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": s.field(block, "text", str, f"{param}.text", required=True)}
    if kind not in ("image", "document"):
        raise s.unsupported(f"a content block of type {kind!r}", f"{param}.type")
    source = s.field(block, "source", dict, f"{param}.source", required=True)
    source_type = source.get("type")
    if source_type == "base64":
        mime = s.field(source, "media_type", str, f"{param}.source.media_type", required=True)
        url = s.data_url(mime, s.field(source, "data", str, f"{param}.source.data", required=True))
        if kind == "document":
            return {"type": "file", "file": {"file_data": url}}
        return {"type": "image_url", "image_url": {"url": url}}
    if source_type == "url" and kind == "image":
        return {"type": "image_url",
                "image_url": {"url": s.field(source, "url", str, f"{param}.source.url", required=True)}}
    if source_type == "text" and kind == "document":
        return {"type": "text", "text": s.field(source, "data", str, f"{param}.source.data", required=True)}
    raise s.unsupported(f"a {kind} source of type {source_type!r}", f"{param}.source.type")


def _canonical_tool(tool: dict[str, Any], param: str) -> dict[str, Any]:
    if tool.get("type") not in (None, "custom"):
        raise s.unsupported(f"the server tool {tool.get('type')!r}", f"{param}.type")
    function = {"name": s.field(tool, "name", str, f"{param}.name", required=True),
                "parameters": s.field(tool, "input_schema", dict, f"{param}.input_schema", required=True)}
    if tool.get("description") is not None:
        function["description"] = s.field(tool, "description", str, f"{param}.description")
    return {"type": "function", "function": function}


def _canonical_tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    kind = choice.get("type")
    out: dict[str, Any] = {}
    if kind == "tool":
        name = s.field(choice, "name", str, "tool_choice.name", required=True)
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind in TOOL_CHOICE_IN:
        out["tool_choice"] = TOOL_CHOICE_IN[kind]
    else:
        raise s.invalid("tool_choice.type", "must be auto, any, tool or none")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False
    return out


# ---- ingress: canonical response → Anthropic ---------------------------------------------------------


def render_response(body: dict[str, Any], model_alias: str) -> dict[str, Any]:
    """An OpenAI ChatCompletion as an Anthropic Message (first choice)."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = s.part_text(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                        "input": s.arguments_object(function.get("arguments"))})
    return {"id": body.get("id"), "type": "message", "role": "assistant", "model": model_alias,
            "content": content, "stop_reason": _stop_reason(choice.get("finish_reason")),
            "stop_sequence": None, "usage": _anthropic_usage(body.get("usage"))}


def _stop_reason(finish_reason: str | None) -> str:
    return FINISH_TO_STOP_REASON.get(finish_reason or "stop", "end_turn")


def _anthropic_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    prompt, completion, cached = s.usage_counts(usage)
    out = {"input_tokens": prompt - cached, "output_tokens": completion}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def render_error(status: int, error_type: str, message: str) -> dict[str, Any]:
    """Our error in Anthropic's shape; its ``type`` follows the HTTP status, as Anthropic's does."""
    kind = STATUS_TO_ERROR_TYPE.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class StreamRenderer:
    """Canonical chunks in, Anthropic SSE events (name, data) out: message_start, then per content block
    content_block_start / content_block_delta (text_delta, input_json_delta) / content_block_stop,
    ping after the first block starts, and at :meth:`close` message_delta (stop_reason, usage) and
    message_stop. Parallel tool calls become consecutive tool_use blocks; a late fragment for a call
    whose block is already closed still goes to that block's index, which the Anthropic SDKs accumulate.
    """

    def __init__(self, model_alias: str, *, input_tokens: int = 0) -> None:
        self.model_alias = model_alias
        self.input_tokens = input_tokens
        self.started = False
        self.message_id = "msg_gateway"
        self.pinged = False
        self.next_block = 0
        self.open_block: int | None = None
        self.text_block: int | None = None
        self.tool_blocks: dict[int, int] = {}  # OpenAI tool_call index → Anthropic block index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, canonical_chunk: dict[str, Any]) -> list[Event]:
        events = [] if self.started else [self._message_start(canonical_chunk)]
        self.started = True
        if canonical_chunk.get("usage"):
            self.usage = canonical_chunk["usage"]
        delta, finish_reason = s.choice_delta(canonical_chunk)
        self.finish_reason = finish_reason or self.finish_reason
        if isinstance(delta.get("content"), str) and delta["content"]:
            if self.text_block is None or self.open_block != self.text_block:
                self.text_block = self.next_block
                events += self._start({"type": "text", "text": ""})
            events.append(self._delta(self.text_block, {"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            index, function = int(call.get("index", 0)), call.get("function") or {}
            if index not in self.tool_blocks:
                self.tool_blocks[index] = self.next_block
                call_id = call.get("id") or s.stable_id("toolu_", self.message_id, index)
                events += self._start({"type": "tool_use", "id": call_id, "name": function.get("name") or "",
                                       "input": {}})
            if function.get("arguments"):
                json_delta = {"type": "input_json_delta", "partial_json": function["arguments"]}
                events.append(self._delta(self.tool_blocks[index], json_delta))
        return events

    def close(self) -> list[Event]:
        events = [] if self.started else [self._message_start({})]
        events += self._stop_open_block()
        stop_reason = _stop_reason(self.finish_reason)
        usage = _anthropic_usage(self.usage)
        if not self.usage:
            usage["input_tokens"] = self.input_tokens
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                         "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _message_start(self, first: dict[str, Any]) -> Event:
        self.message_id = str(first.get("id") or self.message_id)
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant",
                                   "model": self.model_alias, "content": [], "stop_reason": None,
                                   "stop_sequence": None,
                                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}
        return "message_start", {"type": "message_start", "message": message}

    def _start(self, block: dict[str, Any]) -> list[Event]:
        events = self._stop_open_block()
        self.open_block, self.next_block = self.next_block, self.next_block + 1
        events.append(("content_block_start", {"type": "content_block_start", "index": self.open_block,
                                               "content_block": block}))
        if not self.pinged:
            self.pinged = True
            events.append(("ping", {"type": "ping"}))
        return events

    def _stop_open_block(self) -> list[Event]:
        if self.open_block is None:
            return []
        index, self.open_block = self.open_block, None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


# ---- egress: canonical request → Anthropic -----------------------------------------------------------


def to_upstream(request: ChatRequest, provider_model: str, *,
                default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """The Anthropic Messages body for a canonical request."""
    if request.n is not None and request.n > 1:
        raise InvalidRequest("this model returns one choice per request; 'n' must be 1", param="n",
                             code="unsupported_value")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        param = f"messages.{i}"
        if message.role in ("system", "developer"):
            system.append(message.text())
        elif message.role == "user":
            _append_turn(turns, "user", _anthropic_parts(message.content, f"{param}.content"))
        elif message.role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(message, param))
        elif message.role == "tool":
            _append_turn(turns, "user", [_tool_result(message, param)])
        else:
            raise s.function_messages_unsupported(message.role, param)
    instruction = _json_instruction(request.response_format)
    if instruction:
        system.append(instruction)
    max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens
    body: dict[str, Any] = {"model": provider_model, "messages": turns, "max_tokens": max_tokens}
    if system:
        body["system"] = "\n\n".join(system)
    if request.temperature is not None:
        body["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop is not None:
        body["stop_sequences"] = [request.stop] if isinstance(request.stop, str) else request.stop
    if request.tools:
        body["tools"] = [_anthropic_tool(tool.function) for tool in request.tools]
        parallel = (request.model_extra or {}).get("parallel_tool_calls")
        choice = _anthropic_tool_choice(request.tool_choice, parallel)
        if choice:
            body["tool_choice"] = choice
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.stream:
        body["stream"] = True
    return body


def _json_instruction(response_format: dict[str, Any] | None) -> str | None:
    """Anthropic has no JSON mode: ask for JSON in words (None for plain text)."""
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    instruction = "Respond with a single valid JSON object and nothing else."
    schema = ((response_format or {}).get("json_schema") or {}).get("schema")
    if kind == "json_schema" and schema:
        instruction += " It must match this JSON schema: " + json.dumps(schema, ensure_ascii=False)
    return instruction


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive same-role messages become one turn, so tool results share the user turn."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _anthropic_parts(content: str | list[dict[str, Any]] | None, param: str) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []  # Anthropic rejects empty text blocks
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind, where = part.get("type"), f"{param}.{i}"
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": str(part["text"])})
        elif kind == "image_url":
            url = s.image_url_of(part, where)
            inline = s.split_data_url(url)
            source = ({"type": "base64", "media_type": inline[0], "data": inline[1]} if inline
                      else {"type": "url", "url": url})
            blocks.append({"type": "image", "source": source})
        elif kind == "file":
            mime, data = s.file_data(part, where)
            source = {"type": "base64", "media_type": mime, "data": data}
            blocks.append({"type": "document", "source": source})
        else:
            raise s.unsupported(f"content of type {kind!r} for this provider", f"{where}.type")
    return blocks


def _assistant_blocks(message: Message, param: str) -> list[dict[str, Any]]:
    blocks = _anthropic_parts(message.content, f"{param}.content") if message.content else []
    blocks = [b for b in blocks if b.get("type") != "text" or b["text"]]
    for call in message.tool_calls or []:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                       "input": s.arguments_object(call.function.arguments)})
    return blocks


def _tool_result(message: Message, param: str) -> dict[str, Any]:
    if not message.tool_call_id:
        raise InvalidRequest(f"missing required parameter: '{param}.tool_call_id'",
                             param=f"{param}.tool_call_id", code="missing_required_parameter")
    return {"type": "tool_result", "tool_use_id": message.tool_call_id,
            "content": s.part_text(message.content, "\n")}


def _anthropic_tool(function: dict[str, Any]) -> dict[str, Any]:
    tool = {"name": function.get("name"),
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        tool["description"] = function["description"]
    return tool


def _anthropic_tool_choice(choice: str | dict[str, Any] | None, parallel: Any) -> dict[str, Any] | None:
    if isinstance(choice, dict):
        out: dict[str, Any] = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    elif choice in TOOL_CHOICE_OUT:
        out = {"type": TOOL_CHOICE_OUT[choice]}
    elif parallel is False:
        out = {"type": "auto"}
    else:
        return None
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# ---- egress: Anthropic response → canonical ----------------------------------------------------------


def from_upstream(data: dict[str, Any], *, created: int | None = None) -> ChatResponse:
    """An Anthropic Message as a canonical response."""
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise UpstreamBadResponse("Anthropic sent a message without content")
    text, calls = [], []
    for block in data["content"]:
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append(s.tool_call(str(block.get("id", "")), str(block.get("name", "")),
                                     s.arguments_string(block.get("input"))))
    message = s.assistant_message("".join(text), calls)
    finish = STOP_REASON_TO_FINISH.get(data.get("stop_reason") or "end_turn", "stop")
    return s.completion(str(data.get("id", "")), str(data.get("model", "")),
                        created if created is not None else s.now(),
                        [{"message": message, "finish_reason": finish}], _canonical_usage(data.get("usage")))


def _canonical_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + int(usage.get("cache_creation_input_tokens") or 0) + cached
    return s.usage_body(prompt, int(usage.get("output_tokens") or 0), cached=cached)


def upstream_error_message(data: Any) -> str | None:
    """The message in an Anthropic error body, if it is one."""
    error = data.get("error") if isinstance(data, dict) else None
    return str(error["message"]) if isinstance(error, dict) and error.get("message") else None


class UpstreamStreamMapper:
    """Anthropic stream events (the SSE ``data`` objects) in, canonical chunks out.

    tool_use blocks become tool calls numbered 0, 1, … in block order (Anthropic's block index counts
    text blocks too); each block's ``input_json_delta`` fragments pass through as argument deltas of that
    call. A tool_use block that streamed no input gets ``"{}"`` so the arguments always parse. The finish
    reason arrives in message_delta; usage is emitted at message_stop.
    """

    def __init__(self, *, created: int | None = None) -> None:
        self.created = created if created is not None else s.now()
        self.id, self.model = "", ""
        self.tool_of_block: dict[int, int] = {}   # Anthropic block index → OpenAI tool_call index
        self.arguments: dict[int, list[str]] = {}  # Anthropic block index → partial JSON so far
        self.usage: dict[str, Any] = {}
        self.done = False

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.id, self.model = str(message.get("id", "")), str(message.get("model", ""))
            self.usage = dict(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(int(event.get("index", 0)), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(int(event.get("index", 0)), event.get("delta") or {})
        if kind == "content_block_stop":
            index = int(event.get("index", 0))
            if index in self.tool_of_block and not "".join(self.arguments[index]).strip():
                return [self._chunk({"tool_calls": [s.tool_call_delta(self.tool_of_block[index],
                                                                      arguments="{}")]})]
            return []
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, STOP_REASON_TO_FINISH.get(stop_reason or "end_turn", "stop"))]
        if kind == "message_stop":
            self.done = True
            return [s.usage_chunk(self.id, self.model, self.created, _canonical_usage(self.usage))]
        if kind == "error":
            raise _stream_error(event.get("error") or {})
        return []  # ping, and event types added after this was written

    def close(self) -> list[dict[str, Any]]:
        if not self.done:
            raise UpstreamUnavailable("Anthropic's stream ended before message_stop")
        return []

    def _block_start(self, index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []  # thinking, server tools
        tool_index = self.tool_of_block[index] = len(self.tool_of_block)
        initial = s.arguments_string(block["input"]) if block.get("input") else ""
        self.arguments[index] = [initial]
        return [self._chunk({"tool_calls": [s.tool_call_delta(tool_index, str(block.get("id", "")),
                                                              str(block.get("name", "")), initial)]})]

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[dict[str, Any]]:
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        is_arguments = delta.get("type") == "input_json_delta" and index in self.tool_of_block
        if is_arguments and delta.get("partial_json"):
            self.arguments[index].append(delta["partial_json"])
            return [self._chunk({"tool_calls": [s.tool_call_delta(self.tool_of_block[index],
                                                                  arguments=delta["partial_json"])]})]
        return []  # thinking_delta, signature_delta, citations_delta

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return s.chunk(self.id, self.model, self.created, delta, finish_reason)


def _stream_error(error: dict[str, Any]) -> UpstreamError:
    message = f"Anthropic stream error: {error.get('message') or error.get('type') or 'unknown'}"
    if error.get("type") == "rate_limit_error":
        return UpstreamRateLimited(message)
    if error.get("type") in ("overloaded_error", "api_error", "timeout_error"):
        return UpstreamUnavailable(message)
    return UpstreamUnavailable(message)

