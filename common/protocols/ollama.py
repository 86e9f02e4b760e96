"""Ollama ``/api/chat`` ⇄ canonical (OpenAI Chat Completions). Pure functions, no I/O.

Ingress (a client speaks Ollama to the gateway): :func:`parse_request`, :func:`render_response`,
:func:`render_error`, :class:`StreamRenderer` (NDJSON objects). Egress (the gateway calls Ollama):
:func:`to_upstream`, :func:`from_upstream`, :class:`UpstreamStreamMapper`, :func:`upstream_error_message`.

What maps to what
  messages[] system / user / assistant / tool  ⇄ the same roles
  images: [base64, …] on a message             ⇄ image_url parts with ``data:`` URLs (type sniffed)
  tool_calls[].function.arguments (an OBJECT)  ⇄ tool_calls[].function.arguments (a JSON string)
  tool message tool_name / tool_call_id        ⇄ tool_call_id (matched to the assistant's calls)
  tools (OpenAI-shaped)                        ⇄ tools
  format "json" | JSON schema                  ⇄ response_format json_object | json_schema
  options temperature, top_p, seed, stop, num_predict, presence/frequency_penalty
                                               ⇄ temperature, top_p, seed, stop, max_tokens, …
  stream (default TRUE in Ollama)              ⇄ stream (default false)
  done_reason stop | length                    ⇄ finish_reason stop (or tool_calls) | length
  prompt_eval_count / eval_count               ⇄ prompt_tokens / completion_tokens

Lossy choices
  * Ollama has no tool_choice: "none" sends no tools, a named function sends only that tool, and
    "required" cannot be enforced (the tools are sent, the model may still answer in text).
  * Ollama only takes inline base64 images: an ``https://`` image URL is rejected (we do no I/O).
  * Ollama's tool calls carry no id in older servers: ids are derived from the response, and tool
    results are matched by ``tool_name`` (or order) to the calls before them.
  * Dropped: thinking / think, keep_alive, top_k and runtime options (num_ctx, num_gpu, …), which
    OpenAI upstreams would reject; on egress OpenAI-only knobs (logprobs, …). ``n`` > 1 is rejected.
    content_filter renders as done_reason "stop".
  * Durations: we only know wall time, passed in as ``elapsed_ns``; it is reported as both
    total_duration and eval_duration, and load / prompt_eval durations are omitted (as Ollama omits 0).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from common.errors import InvalidRequest, UpstreamBadResponse, UpstreamUnavailable
from common.protocols import shared as s
from common.types import ChatRequest, ChatResponse, Message

ROLES = ("system", "user", "assistant", "tool")
DONE_REASON_TO_FINISH = {"stop": "stop", "length": "length"}
FINISH_TO_DONE_REASON = {"length": "length"}  # everything else is "stop"
# Options that are also OpenAI parameters. top_k is not, so it never enters a canonical request, but a
# canonical request that carries it (vLLM-style) passes it on.
SHARED_OPTIONS = ("seed", "presence_penalty", "frequency_penalty")
EGRESS_OPTIONS = (*SHARED_OPTIONS, "top_k")

# ---- ingress: Ollama request → canonical -------------------------------------------------------------


def parse_request(body: Any) -> ChatRequest:
    """Validate an Ollama chat body and translate it. Raises InvalidRequest naming the Ollama
    parameter at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    stream = s.field(body, "stream", bool, "stream")
    payload: dict[str, Any] = {"model": s.field(body, "model", str, "model", required=True),
                               "stream": True if stream is None else stream}
    turns = s.objects(s.field(body, "messages", list, "messages", required=True), "messages")
    if not turns:
        raise InvalidRequest("'messages' must contain at least one message (this gateway does not load "
                             "or unload models)", param="messages")
    payload["messages"] = _canonical_messages(turns)
    payload.update(_canonical_options(s.field(body, "options", dict, "options") or {}))
    if body.get("tools") is not None:
        tools = s.objects(body["tools"], "tools")
        payload["tools"] = [_checked_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    if body.get("format") not in (None, ""):
        payload["response_format"] = _canonical_format(body["format"])
    return s.canonical_request(payload)


def _canonical_messages(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of tool calls not yet answered
    for i, turn in enumerate(turns):
        param = f"messages.{i}"
        role = s.field(turn, "role", str, f"{param}.role", required=True)
        if role not in ROLES:
            raise s.invalid(f"{param}.role", f"must be one of {', '.join(ROLES)}")
        content = s.field(turn, "content", str, f"{param}.content") or ""
        message: dict[str, Any] = {"role": role, "content": content}
        images = s.strings(turn["images"], f"{param}.images") if turn.get("images") else []
        if images:
            parts = [{"type": "text", "text": content}] if content else []
            message["content"] = parts + [{"type": "image_url", "image_url": {"url": s.data_url(
                s.sniff_image_mime(image), image)}} for image in images]
        if role == "assistant" and turn.get("tool_calls"):
            calls = [_canonical_call(call, f"{param}.tool_calls.{j}", f"call_{i}_{j}")
                     for j, call in enumerate(s.objects(turn["tool_calls"], f"{param}.tool_calls"))]
            message["tool_calls"], message["content"] = calls, content or None
            pending = [(call["id"], call["function"]["name"]) for call in calls]
        if role == "tool":
            message["tool_call_id"] = _answered_call(turn, pending, param, f"call_{i}")
        messages.append(message)
    return messages


def _canonical_call(call: dict[str, Any], param: str, default_id: str) -> dict[str, Any]:
    function = s.field(call, "function", dict, f"{param}.function", required=True)
    arguments = s.field(function, "arguments", (dict, str), f"{param}.function.arguments") or {}
    return s.tool_call(s.field(call, "id", str, f"{param}.id") or default_id,
                       s.field(function, "name", str, f"{param}.function.name", required=True),
                       s.arguments_string(arguments))


def _answered_call(turn: dict[str, Any], pending: list[tuple[str, str]], param: str, default_id: str) -> str:
    """The id of the call a tool message answers: its tool_call_id if it has one, else the first
    unanswered call with its tool_name, else (no tool_name) the first unanswered call."""
    call_id = s.field(turn, "tool_call_id", str, f"{param}.tool_call_id")
    name = s.field(turn, "tool_name", str, f"{param}.tool_name")
    if call_id:
        match = next((call for call in pending if call[0] == call_id), None)
    elif name:
        match = next((call for call in pending if call[1] == name), None)
    else:
        match = pending[0] if pending else None
    if match is None:
        return call_id or default_id
    pending.remove(match)
    return match[0]


def _canonical_options(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"temperature": s.number(options.get("temperature"), "options.temperature", 0, 2),
                           "top_p": s.number(options.get("top_p"), "options.top_p", 0, 1)}
    num_predict = s.field(options, "num_predict", int, "options.num_predict")
    if num_predict is not None and num_predict > 0:  # -1 (no limit) and -2 (fill the context) mean no cap
        out["max_tokens"] = num_predict
    if options.get("stop") is not None:
        out["stop"] = s.strings(options["stop"], "options.stop")
    for key in SHARED_OPTIONS:
        out[key] = s.field(options, key, int if key == "seed" else (int, float), f"options.{key}")
    return {k: v for k, v in out.items() if v is not None}


def _checked_tool(tool: dict[str, Any], param: str) -> dict[str, Any]:
    function = s.field(tool, "function", dict, f"{param}.function", required=True)
    s.field(function, "name", str, f"{param}.function.name", required=True)
    return {"type": "function", "function": function}


def _canonical_format(value: Any) -> dict[str, Any]:
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}
    raise s.invalid("format", 'expected "json" or a JSON schema object')


# ---- ingress: canonical response → Ollama -------------------------------------------------------------


def render_response(body: dict[str, Any], model_alias: str, *, elapsed_ns: int = 0) -> dict[str, Any]:
    """An OpenAI ChatCompletion as an Ollama chat response (first choice)."""
    choice = (body.get("choices") or [{}])[0]
    source = choice.get("message") or {}
    message: dict[str, Any] = {"role": "assistant", "content": s.part_text(source.get("content"))}
    if source.get("tool_calls"):
        message["tool_calls"] = [_ollama_call(call) for call in source["tool_calls"]]
    return {"model": model_alias, "created_at": _timestamp(body.get("created")), "message": message,
            **_final_fields(choice.get("finish_reason"), body.get("usage"), elapsed_ns)}


def _ollama_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    out: dict[str, Any] = {"function": {"name": function.get("name"),
                                        "arguments": s.arguments_object(function.get("arguments"))}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def _final_fields(finish_reason: str | None, usage: dict[str, Any] | None, elapsed_ns: int) -> dict[str, Any]:
    prompt, completion, _ = s.usage_counts(usage)
    out: dict[str, Any] = {"done_reason": FINISH_TO_DONE_REASON.get(finish_reason or "stop", "stop"),
                           "done": True}
    if elapsed_ns > 0:
        out["total_duration"] = elapsed_ns
    out["prompt_eval_count"] = prompt
    out["eval_count"] = completion
    if elapsed_ns > 0:
        out["eval_duration"] = elapsed_ns
    return out


def _timestamp(created: Any) -> str:
    moment = datetime.fromtimestamp(created if isinstance(created, int | float) else 0, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def render_error(status: int, error_type: str, message: str) -> dict[str, Any]:
    """Ollama's error shape is a bare message; the HTTP status carries the kind."""
    return {"error": message}


class StreamRenderer:
    """Canonical chunks in, Ollama NDJSON objects out: one ``done: false`` object per text delta, the
    tool calls whole in one object once they are complete (at the finish reason, or when text follows
    them), and at :meth:`close` the final ``done: true`` object with done_reason, counts and durations."""

    def __init__(self, model_alias: str) -> None:
        self.model_alias = model_alias
        self.created_at = _timestamp(0)
        self.tool_calls = s.ToolCallBuffer()
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, canonical_chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if canonical_chunk.get("created"):
            self.created_at = _timestamp(canonical_chunk["created"])
        if canonical_chunk.get("usage"):
            self.usage = canonical_chunk["usage"]
        delta, finish_reason = s.choice_delta(canonical_chunk)
        self.finish_reason = finish_reason or self.finish_reason
        out = []
        if delta.get("content"):  # text after tool calls: those calls are complete, keep their place
            out = self._flush_tool_calls() + [self._message({"content": delta["content"]})]
        self.tool_calls.add(delta.get("tool_calls") or [])
        return out + (self._flush_tool_calls() if finish_reason else [])

    def close(self, *, elapsed_ns: int = 0) -> list[dict[str, Any]]:
        final = {"model": self.model_alias, "created_at": self.created_at,
                 "message": {"role": "assistant", "content": ""},
                 **_final_fields(self.finish_reason, self.usage, elapsed_ns)}
        return self._flush_tool_calls() + [final]

    def _flush_tool_calls(self) -> list[dict[str, Any]]:
        if not self.tool_calls:
            return []
        calls = [_ollama_call(call) for call in self.tool_calls.drain()]
        return [self._message({"content": "", "tool_calls": calls})]

    def _message(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model_alias, "created_at": self.created_at,
                "message": {"role": "assistant", **fields}, "done": False}


# ---- egress: canonical request → Ollama ---------------------------------------------------------------


def to_upstream(request: ChatRequest, provider_model: str) -> dict[str, Any]:
    """The Ollama /api/chat body for a canonical request. ``stream`` is always explicit."""
    if request.n is not None and request.n > 1:
        raise InvalidRequest("this model returns one choice per request; 'n' must be 1", param="n",
                             code="unsupported_value")
    names: dict[str, str] = {}  # tool_call_id → function name, for the tool messages that answer them
    messages = []
    for i, message in enumerate(request.messages):
        for call in message.tool_calls or []:
            names[call.id] = call.function.name
        messages.append(_ollama_message(message, f"messages.{i}", names))
    body: dict[str, Any] = {"model": provider_model, "messages": messages, "stream": request.stream}
    options = _ollama_options(request)
    if options:
        body["options"] = options
    tools = _ollama_tools(request)
    if tools:
        body["tools"] = tools
    kind = (request.response_format or {}).get("type")
    if kind == "json_object":
        body["format"] = "json"
    elif kind == "json_schema":
        body["format"] = ((request.response_format or {}).get("json_schema") or {}).get("schema") or "json"
    return body


def _ollama_message(message: Message, param: str, names: dict[str, str]) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    if role not in ROLES:
        raise s.function_messages_unsupported(message.role, param)
    out: dict[str, Any] = {"role": role, "content": s.part_text(message.content, "\n")}
    images = []
    for j, part in enumerate(message.content if isinstance(message.content, list) else []):
        kind, where = part.get("type"), f"{param}.content.{j}"
        if kind == "image_url":
            inline = s.split_data_url(s.image_url_of(part, where))
            if inline is None:
                raise s.unsupported("an image by URL (send it inline as a data: URL)", f"{where}.image_url")
            images.append(inline[1])
        elif kind != "text":
            raise s.unsupported(f"content of type {kind!r} for this provider", f"{where}.type")
    if images:
        out["images"] = images
    if message.tool_calls:
        out["tool_calls"] = [{"function": {"name": c.function.name, "arguments": s.arguments_object(
            c.function.arguments)}} for c in message.tool_calls]
    name = names.get(message.tool_call_id or "")
    if role == "tool" and name:
        out["tool_name"] = name
    return out


def _ollama_options(request: ChatRequest) -> dict[str, Any]:
    extra = request.model_extra or {}
    options: dict[str, Any] = {key: extra[key] for key in EGRESS_OPTIONS if extra.get(key) is not None}
    if request.temperature is not None:
        options["temperature"] = request.temperature
    if request.top_p is not None:
        options["top_p"] = request.top_p
    if request.max_completion_tokens or request.max_tokens:
        options["num_predict"] = request.max_completion_tokens or request.max_tokens
    if request.stop is not None:
        options["stop"] = [request.stop] if isinstance(request.stop, str) else request.stop
    return options


def _ollama_tools(request: ChatRequest) -> list[dict[str, Any]]:
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return []
    functions = [tool.function for tool in request.tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f.get("name") == name] or functions
    return [{"type": "function", "function": function} for function in functions]


# ---- egress: Ollama response → canonical --------------------------------------------------------------


def from_upstream(data: dict[str, Any]) -> ChatResponse:
    """An Ollama chat response (``stream: false``) as a canonical response."""
    if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
        raise UpstreamBadResponse("Ollama sent a response without a message")
    created_at = str(data.get("created_at", ""))
    source = data["message"]
    calls = [_canonical_upstream_call(call, s.stable_id("call_", created_at, i))
             for i, call in enumerate(source.get("tool_calls") or [])]
    message = s.assistant_message(str(source.get("content") or ""), calls)
    finish = "tool_calls" if calls else DONE_REASON_TO_FINISH.get(data.get("done_reason") or "stop", "stop")
    return s.completion(s.stable_id("chatcmpl-", created_at, data.get("model")), str(data.get("model", "")),
                        _epoch(created_at), [{"message": message, "finish_reason": finish}], _usage(data))


def _canonical_upstream_call(call: dict[str, Any], default_id: str) -> dict[str, Any]:
    function = call.get("function") or {}
    return s.tool_call(call.get("id") or default_id, str(function.get("name", "")),
                       s.arguments_string(function.get("arguments")))


def _usage(data: dict[str, Any]) -> dict[str, Any]:
    return s.usage_body(int(data.get("prompt_eval_count") or 0), int(data.get("eval_count") or 0))


def _epoch(created_at: str) -> int:
    try:
        return int(datetime.fromisoformat(created_at).timestamp())
    except ValueError:
        return s.now()


def upstream_error_message(data: Any) -> str | None:
    """The message in an Ollama error body (``{"error": "…"}``), if it is one."""
    error = data.get("error") if isinstance(data, dict) else None
    return str(error) if error else None


class UpstreamStreamMapper:
    """Ollama NDJSON objects in, canonical chunks out. Ollama sends each tool call whole, so every call
    becomes one tool-call delta with the next index; the ``done: true`` object yields the finish chunk and
    the usage chunk."""

    def __init__(self) -> None:
        self.id, self.model, self.created = "", "", 0
        self.tool_calls = 0
        self.done = False

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if data.get("error"):
            raise UpstreamUnavailable(f"Ollama stream error: {data['error']}")
        out = []
        if not self.id:
            created_at = str(data.get("created_at", ""))
            self.id = s.stable_id("chatcmpl-", created_at, data.get("model"))
            self.model, self.created = str(data.get("model", "")), _epoch(created_at)
            out.append(self._chunk({"role": "assistant", "content": ""}))
        message = data.get("message") or {}
        if message.get("content"):
            out.append(self._chunk({"content": message["content"]}))
        for call in message.get("tool_calls") or []:
            full = _canonical_upstream_call(call, s.stable_id("call_", self.id, self.tool_calls))
            out.append(self._chunk({"tool_calls": [s.tool_call_delta(
                self.tool_calls, full["id"], full["function"]["name"], full["function"]["arguments"])]}))
            self.tool_calls += 1
        if data.get("done"):
            self.done = True
            finish = "tool_calls" if self.tool_calls else DONE_REASON_TO_FINISH.get(
                data.get("done_reason") or "stop", "stop")
            out += [self._chunk({}, finish), s.usage_chunk(self.id, self.model, self.created, _usage(data))]
        return out

    def close(self) -> list[dict[str, Any]]:
        if not self.done:
            raise UpstreamUnavailable("Ollama's stream ended before its final (done) object")
        return []

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return s.chunk(self.id, self.model, self.created, delta, finish_reason)
