"""Gemini ``generateContent`` / ``streamGenerateContent`` ⇄ canonical (OpenAI Chat Completions).
Pure functions, no I/O.

Ingress (a client speaks Gemini to the gateway; served by ``api/gemini_routes.py``): :func:`parse_request`,
:func:`render_response`, :func:`render_error`, :class:`StreamRenderer` (one GenerateContentResponse per
SSE event or JSON array element). Egress (the gateway calls Gemini): :func:`to_upstream`,
:func:`upstream_path`, :func:`from_upstream`, :class:`UpstreamStreamMapper`, :func:`upstream_error_message`.
The model is part of the URL, not the body.

What maps to what
  systemInstruction.parts[].text                ⇄ a leading system message
  contents[] role user / model                  ⇄ user / assistant messages
  text / inlineData / fileData parts            ⇄ text / image_url (``data:`` URL ⇄ inlineData, other URLs
                                                  ⇄ fileData) and PDF inlineData ⇄ file parts
  functionCall {name, args, id}                 ⇄ assistant tool_calls (args object ⇄ arguments string);
    its thoughtSignature                        ⇄ tool_calls[].extra_content.google.thought_signature
  functionResponse {name, response, id}         ⇄ role "tool" message (response ⇄ JSON text content)
  tools[].functionDeclarations {name, description, parameters | parametersJsonSchema}
                                                ⇄ tools[].function {name, description, parameters}
  toolConfig.functionCallingConfig mode AUTO | NONE | ANY (+ allowedFunctionNames)
                                                ⇄ tool_choice "auto" | "none" | "required" | {function}
  generationConfig temperature, topP, maxOutputTokens, stopSequences, candidateCount, seed,
    presencePenalty, frequencyPenalty           ⇄ temperature, top_p, max_tokens, stop, n, seed, …
  responseMimeType application/json (+ responseSchema | responseJsonSchema)
                                                ⇄ response_format json_object | json_schema
  finishReason STOP ⇄ stop (tool_calls when the reply has functionCall parts); MAX_TOKENS ⇄ length;
    SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII, … ⇄ content_filter
  usageMetadata promptTokenCount ⇄ prompt_tokens; candidatesTokenCount + thoughtsTokenCount ⇄
    completion_tokens (thoughts ⇄ reasoning_tokens); cachedContentTokenCount ⇄ cached_tokens

Lossy choices
  * Both camelCase and snake_case field names are accepted on ingress (the REST API takes both).
  * OpenAPI-style schemas (``"type": "OBJECT"``, ``nullable``) become JSON Schema on ingress; on egress
    we send ``parametersJsonSchema`` / ``responseJsonSchema``, which take JSON Schema as it is.
  * Egress functionCall parts carry no ``id`` (Gemini matches responses by name and order); tool
    results are named after the call they answer. Non-object tool output is sent as ``{"output": …}``.
  * functionCall ids missing from Gemini are derived from the response; missing ones in a request are
    positional, and functionResponses are matched to calls by id, else by name (first unanswered).
  * allowedFunctionNames with several names narrows ``tools`` to those functions (tool_choice "required").
  * Dropped: topK, thinkingConfig, safetySettings, thought parts, text thoughtSignatures, logprobs;
    VALIDATED mode becomes "auto"; finish reasons OTHER / MALFORMED_FUNCTION_CALL become "stop".
    Server tools (googleSearch, codeExecution, …) and cachedContent are rejected.
  * Streaming with candidateCount > 1 is rejected: the stream renderer handles one candidate.
"""

from __future__ import annotations

import json
import mimetypes
import re
from typing import Any

from common.errors import InvalidRequest, UpstreamBadResponse, UpstreamUnavailable
from common.protocols import shared as s
from common.types import ChatRequest, ChatResponse, Message

FINISH_TO_CANONICAL = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                       "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                       "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
                       "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter"}
CANONICAL_TO_FINISH = {"stop": "STOP", "tool_calls": "STOP", "function_call": "STOP", "length": "MAX_TOKENS",
                       "content_filter": "SAFETY"}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
MODES_IN = {"AUTO": "auto", "VALIDATED": "auto", "NONE": "none", "ANY": "required"}
MODES_OUT = {"auto": "AUTO", "none": "NONE", "required": "ANY"}

# ---- ingress: Gemini request → canonical -------------------------------------------------------------


def _get(obj: dict[str, Any], name: str) -> Any:
    """A field by its camelCase name, or its snake_case spelling."""
    value = obj.get(name)
    return value if value is not None else obj.get(re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower())


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], param: str, *,
           required: bool = False) -> Any:
    return s.expect(_get(obj, name), kind, param, required=required)


def parse_request(body: Any, model: str, *, stream: bool = False) -> ChatRequest:
    """Validate a Gemini generateContent body (``model`` comes from the URL path) and translate it.
    Raises InvalidRequest naming the Gemini parameter at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    payload: dict[str, Any] = {"model": model.removeprefix("models/"), "stream": stream}
    messages: list[dict[str, Any]] = []
    system = _get(body, "systemInstruction")
    if system is not None:
        system = s.expect(system, dict, "systemInstruction")
        parts = s.objects(_get(system, "parts") or [], "systemInstruction.parts")
        messages.append({"role": "system", "content": "\n".join(str(p.get("text", "")) for p in parts)})
    contents = s.objects(s.field(body, "contents", list, "contents", required=True), "contents")
    if not contents:
        raise InvalidRequest("'contents' must contain at least one content", param="contents")
    pending: list[tuple[str, str]] = []  # (id, name) of function calls not yet answered
    for i, content in enumerate(contents):
        messages.extend(_canonical_messages(content, i, pending))
    payload["messages"] = messages
    if _get(body, "cachedContent") is not None:
        raise s.unsupported("cachedContent", "cachedContent")
    if body.get("tools") is not None:
        payload["tools"] = [tool for i, t in enumerate(s.objects(body["tools"], "tools"))
                            for tool in _canonical_tools(t, f"tools.{i}")]
    config = _field(body, "toolConfig", dict, "toolConfig")
    if config is not None:
        payload.update(_canonical_tool_choice(config, payload))
    generation = _field(body, "generationConfig", dict, "generationConfig")
    if generation is not None:
        payload.update(_canonical_generation(generation))
    if stream and (payload.get("n") or 1) > 1:
        raise s.unsupported("streaming more than one candidate", "generationConfig.candidateCount")
    return s.canonical_request(payload)


def _canonical_messages(content: dict[str, Any], index: int, pending: list[tuple[str, str]]) -> list[dict]:
    param = f"contents.{index}"
    role = s.field(content, "role", str, f"{param}.role") or "user"
    if role not in ("user", "model", "function"):
        raise s.invalid(f"{param}.role", "must be 'user' or 'model'")
    parts = s.objects(s.field(content, "parts", list, f"{param}.parts", required=True), f"{param}.parts")
    if role == "model":
        return [_assistant_message(parts, index, pending)]
    tool_messages, user_parts = [], []
    for j, part in enumerate(parts):
        where = f"{param}.parts.{j}"
        response = _field(part, "functionResponse", dict, f"{where}.functionResponse")
        if response is not None:
            tool_messages.append(_tool_message(response, where, pending))
        else:
            user_parts.append(_canonical_part(part, where))
    return tool_messages + ([{"role": "user", "content": user_parts}] if user_parts else [])


def _assistant_message(parts: list[dict[str, Any]], index: int, pending: list[tuple[str, str]]) -> dict:
    text, calls = [], []
    for j, part in enumerate(parts):
        where = f"contents.{index}.parts.{j}"
        call = _field(part, "functionCall", dict, f"{where}.functionCall")
        if call is not None:
            entry = s.tool_call(s.field(call, "id", str, f"{where}.functionCall.id") or f"call_{index}_{j}",
                                s.field(call, "name", str, f"{where}.functionCall.name", required=True),
                                s.arguments_string(s.field(call, "args", dict, f"{where}.functionCall.args")))
            if _get(part, "thoughtSignature"):
                entry["extra_content"] = {"google": {"thought_signature": _get(part, "thoughtSignature")}}
            calls.append(entry)
        elif isinstance(part.get("text"), str) and not part.get("thought"):
            text.append(part["text"])
        elif not part.get("thought"):
            raise s.unsupported("a model part other than text or functionCall", where)
    pending[:] = [(call["id"], call["function"]["name"]) for call in calls]
    return s.assistant_message("".join(text), calls)


def _tool_message(response: dict[str, Any], param: str, pending: list[tuple[str, str]]) -> dict[str, Any]:
    name = s.field(response, "name", str, f"{param}.functionResponse.name", required=True)
    call_id = s.field(response, "id", str, f"{param}.functionResponse.id")
    match = next((c for c in pending if c[0] == call_id), None) if call_id else None
    match = match or next((c for c in pending if c[1] == name), None)
    if match:
        pending.remove(match)
    result = s.field(response, "response", dict, f"{param}.functionResponse.response") or {}
    return {"role": "tool", "tool_call_id": call_id or (match[0] if match else f"call_{name}"),
            "content": json.dumps(result, ensure_ascii=False)}


def _canonical_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    if isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    inline, file = _get(part, "inlineData"), _get(part, "fileData")
    if isinstance(inline, dict):
        mime = _field(inline, "mimeType", str, f"{param}.inlineData.mimeType", required=True)
        url = s.data_url(mime, s.field(inline, "data", str, f"{param}.inlineData.data", required=True))
        if mime.startswith("image/"):
            return {"type": "image_url", "image_url": {"url": url}}
        if mime == "application/pdf":
            return {"type": "file", "file": {"file_data": url}}
        raise s.unsupported(f"inline data of type {mime!r}", f"{param}.inlineData.mimeType")
    if isinstance(file, dict):
        uri = _field(file, "fileUri", str, f"{param}.fileData.fileUri", required=True)
        mime = _get(file, "mimeType") or mimetypes.guess_type(uri)[0] or "image/jpeg"
        if not str(mime).startswith("image/"):
            raise s.unsupported(f"file data of type {mime!r}", f"{param}.fileData.mimeType")
        return {"type": "image_url", "image_url": {"url": uri}}
    raise s.unsupported("a user part other than text, inlineData, fileData or functionResponse", param)


def _canonical_tools(tool: dict[str, Any], param: str) -> list[dict[str, Any]]:
    declarations = _get(tool, "functionDeclarations")
    others = [key for key in tool if key not in ("functionDeclarations", "function_declarations")]
    if others or declarations is None:
        raise s.unsupported(f"the tool {others[0] if others else 'without functionDeclarations'!r}", param)
    out = []
    for k, declaration in enumerate(s.objects(declarations, f"{param}.functionDeclarations")):
        where = f"{param}.functionDeclarations.{k}"
        function = {"name": s.field(declaration, "name", str, f"{where}.name", required=True)}
        if declaration.get("description") is not None:
            function["description"] = s.field(declaration, "description", str, f"{where}.description")
        schema = _get(declaration, "parametersJsonSchema") or _json_schema(declaration.get("parameters"))
        if schema:
            function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _json_schema(schema: Any) -> Any:
    """Gemini's OpenAPI-subset schema as JSON Schema: lower-case types, ``nullable`` as a null type."""
    if isinstance(schema, list):
        return [_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _json_schema(value) for key, value in schema.items()
           if key not in ("nullable", "propertyOrdering")}
    if isinstance(out.get("type"), str):
        out["type"] = out["type"].lower()
        if schema.get("nullable"):
            out["type"] = [out["type"], "null"]
    return out


def _canonical_tool_choice(config: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    calling = _get(config, "functionCallingConfig") or {}
    mode = str(calling.get("mode") or "AUTO")
    if mode not in MODES_IN:
        raise s.invalid("toolConfig.functionCallingConfig.mode", "must be AUTO, ANY, NONE or VALIDATED")
    allowed = _get(calling, "allowedFunctionNames") or []
    if mode == "ANY" and len(allowed) == 1:
        return {"tool_choice": {"type": "function", "function": {"name": allowed[0]}}}
    out: dict[str, Any] = {"tool_choice": MODES_IN[mode]}
    if mode == "ANY" and allowed and payload.get("tools"):
        out["tools"] = [t for t in payload["tools"] if t["function"]["name"] in allowed]
    return out


def _canonical_generation(config: dict[str, Any]) -> dict[str, Any]:
    p = "generationConfig"
    out: dict[str, Any] = {
        "temperature": s.number(config.get("temperature"), f"{p}.temperature", 0, 2),
        "top_p": s.number(_get(config, "topP"), f"{p}.topP", 0, 1),
        "max_tokens": _field(config, "maxOutputTokens", int, f"{p}.maxOutputTokens"),
        "n": _field(config, "candidateCount", int, f"{p}.candidateCount"),
        "seed": s.field(config, "seed", int, f"{p}.seed"),
        "presence_penalty": s.number(_get(config, "presencePenalty"), f"{p}.presencePenalty", -2, 2),
        "frequency_penalty": s.number(_get(config, "frequencyPenalty"), f"{p}.frequencyPenalty", -2, 2),
    }
    if _get(config, "stopSequences") is not None:
        out["stop"] = s.strings(_get(config, "stopSequences"), f"{p}.stopSequences")
    mime = _get(config, "responseMimeType")
    if mime == "application/json":
        schema = _get(config, "responseJsonSchema") or _json_schema(_get(config, "responseSchema"))
        out["response_format"] = {"type": "json_object"}
        if schema:
            json_schema = {"name": "response", "schema": schema}
            out["response_format"] = {"type": "json_schema", "json_schema": json_schema}
    elif mime not in (None, "text/plain"):
        raise s.unsupported(f"responseMimeType {mime!r}", f"{p}.responseMimeType")
    return {k: v for k, v in out.items() if v is not None}


# ---- ingress: canonical response → Gemini -------------------------------------------------------------


def render_response(body: dict[str, Any], model_alias: str) -> dict[str, Any]:
    """An OpenAI ChatCompletion as a GenerateContentResponse (one candidate per choice)."""
    candidates = []
    for choice in body.get("choices") or []:
        message = choice.get("message") or {}
        parts = _gemini_parts(s.part_text(message.get("content")), message.get("tool_calls") or [])
        candidates.append({"content": {"role": "model", "parts": parts}, "index": choice.get("index", 0),
                           "finishReason": _finish_reason(choice.get("finish_reason"))})
    return {"candidates": candidates, "usageMetadata": _usage_metadata(body.get("usage")),
            "modelVersion": model_alias, "responseId": body.get("id")}


def _finish_reason(finish_reason: str | None) -> str:
    return CANONICAL_TO_FINISH.get(finish_reason or "stop", "OTHER")


def _gemini_parts(text: str, calls: list[dict[str, Any]], *, with_ids: bool = True) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    for call in calls:
        function = call.get("function") or {}
        function_call = {"name": function.get("name"), "args": s.arguments_object(function.get("arguments"))}
        if with_ids and call.get("id"):
            function_call["id"] = call["id"]
        part: dict[str, Any] = {"functionCall": function_call}
        signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
        if signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return parts or [{"text": ""}]


def _usage_metadata(usage: dict[str, Any] | None) -> dict[str, Any]:
    prompt, completion, cached = s.usage_counts(usage)
    reasoning = int(((usage or {}).get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    out = {"promptTokenCount": prompt, "candidatesTokenCount": completion - reasoning,
           "totalTokenCount": prompt + completion}
    if reasoning:
        out["thoughtsTokenCount"] = reasoning
    if cached:
        out["cachedContentTokenCount"] = cached
    return out


def render_error(status: int, error_type: str, message: str, *, param: str | None = None) -> dict[str, Any]:
    """Our error in Google's shape: the HTTP code, the message and the canonical status name; the
    parameter at fault, if known, as a ``google.rpc.BadRequest`` field violation (as Google reports it)."""
    name = STATUS_NAMES.get(status) or ("INVALID_ARGUMENT" if status < 500 else "INTERNAL")
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if param:
        error["details"] = [{"@type": BAD_REQUEST_TYPE,
                             "fieldViolations": [{"field": param, "description": message}]}]
    return {"error": error}


class StreamRenderer:
    """Canonical chunks in, GenerateContentResponse chunks out: one per text delta, function calls whole
    (as Gemini sends them) once complete, and at :meth:`close` a last one with any remaining calls,
    finishReason and usageMetadata."""

    def __init__(self, model_alias: str) -> None:
        self.model_alias = model_alias
        self.response_id: str | None = None
        self.tool_calls = s.ToolCallBuffer()
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, canonical_chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self.response_id = self.response_id or canonical_chunk.get("id")
        if canonical_chunk.get("usage"):
            self.usage = canonical_chunk["usage"]
        delta, finish_reason = s.choice_delta(canonical_chunk)
        self.finish_reason = finish_reason or self.finish_reason
        out = []
        if delta.get("content"):  # text after tool calls: those calls are complete, keep their place
            if self.tool_calls:
                out.append(self._response(self._candidate(_gemini_parts("", self.tool_calls.drain()))))
            out.append(self._response(self._candidate([{"text": delta["content"]}])))
        self.tool_calls.add(delta.get("tool_calls") or [])
        return out

    def close(self) -> list[dict[str, Any]]:
        candidate = self._candidate(_gemini_parts("", self.tool_calls.drain()))
        candidate["finishReason"] = _finish_reason(self.finish_reason)
        return [{**self._response(candidate), "usageMetadata": _usage_metadata(self.usage)}]

    @staticmethod
    def _candidate(parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"content": {"role": "model", "parts": parts}, "index": 0}

    def _response(self, candidate: dict[str, Any]) -> dict[str, Any]:
        return {"candidates": [candidate], "modelVersion": self.model_alias, "responseId": self.response_id}


# ---- egress: canonical request → Gemini ---------------------------------------------------------------


def upstream_path(provider_model: str, *, stream: bool) -> str:
    """The path (under the API version, e.g. ``/v1beta``) to call for a model."""
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"models/{provider_model.removeprefix('models/')}:{method}"


def to_upstream(request: ChatRequest) -> dict[str, Any]:
    """The generateContent body for a canonical request (the model goes in :func:`upstream_path`)."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id → function name, to name the function responses
    for i, message in enumerate(request.messages):
        param = f"messages.{i}"
        if message.role in ("system", "developer"):
            system.append({"text": message.text()})
        elif message.role == "user":
            _append(contents, "user", _user_parts(message.content, f"{param}.content"))
        elif message.role == "assistant":
            calls = [call.model_dump(exclude_none=True) for call in message.tool_calls or []]
            names.update({call["id"]: call["function"]["name"] for call in calls})
            _append(contents, "model", _gemini_parts(s.part_text(message.content), calls, with_ids=False))
        elif message.role == "tool":
            _append(contents, "user", [_function_response(message, param, names)])
        else:
            raise s.function_messages_unsupported(message.role, param)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    if request.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(tool.function) for tool in request.tools]}]
        mode = _function_calling_config(request.tool_choice)
        if mode:
            body["toolConfig"] = {"functionCallingConfig": mode}
    generation = _generation_config(request)
    if generation:
        body["generationConfig"] = generation
    return body


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    """Consecutive same-role turns merge: parallel function responses must share one turn."""
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _user_parts(content: str | list[dict[str, Any]] | None, param: str) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"text": content or ""}]
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind, where = part.get("type"), f"{param}.{j}"
        if kind == "text":
            parts.append({"text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = s.image_url_of(part, where)
            inline = s.split_data_url(url)
            if inline:
                parts.append({"inlineData": {"mimeType": inline[0], "data": inline[1]}})
            else:
                mime = mimetypes.guess_type(url)[0] or "image/jpeg"
                parts.append({"fileData": {"mimeType": mime, "fileUri": url}})
        elif kind == "file":
            mime, data = s.file_data(part, where)
            parts.append({"inlineData": {"mimeType": mime, "data": data}})
        else:
            raise s.unsupported(f"content of type {kind!r} for this provider", f"{where}.type")
    return parts


def _function_response(message: Message, param: str, names: dict[str, str]) -> dict[str, Any]:
    name = names.get(message.tool_call_id or "") or message.name
    if not name:
        raise InvalidRequest(f"'{param}.tool_call_id' does not match any earlier tool call, and Gemini needs "
                             "the function's name", param=f"{param}.tool_call_id")
    text = s.part_text(message.content, "\n")
    try:
        result = json.loads(text)
    except ValueError:
        result = None
    response = result if isinstance(result, dict) else {"output": text}
    return {"functionResponse": {"name": name, "response": response}}


def _declaration(function: dict[str, Any]) -> dict[str, Any]:
    declaration = {"name": function.get("name"), "description": function.get("description") or ""}
    if function.get("parameters"):
        declaration["parametersJsonSchema"] = function["parameters"]
    return declaration


def _function_calling_config(choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(choice, dict):
        return {"mode": "ANY", "allowedFunctionNames": [(choice.get("function") or {}).get("name")]}
    return {"mode": MODES_OUT[choice]} if choice in MODES_OUT else None


def _generation_config(request: ChatRequest) -> dict[str, Any]:
    extra = request.model_extra or {}
    config = {"temperature": request.temperature, "topP": request.top_p, "topK": extra.get("top_k"),
              "maxOutputTokens": request.max_completion_tokens or request.max_tokens,
              "stopSequences": [request.stop] if isinstance(request.stop, str) else request.stop,
              "candidateCount": request.n, "seed": extra.get("seed"),
              "presencePenalty": extra.get("presence_penalty"),
              "frequencyPenalty": extra.get("frequency_penalty")}
    response_format = request.response_format or {}
    if response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        config["responseJsonSchema"] = (response_format.get("json_schema") or {}).get("schema")
    return {k: v for k, v in config.items() if v is not None}


# ---- egress: Gemini response → canonical --------------------------------------------------------------


def from_upstream(data: dict[str, Any], *, created: int | None = None) -> ChatResponse:
    """A GenerateContentResponse as a canonical response (one choice per candidate)."""
    if not isinstance(data, dict):
        raise UpstreamBadResponse("Gemini sent a malformed response")
    if not data.get("candidates") and not (data.get("promptFeedback") or {}).get("blockReason"):
        raise UpstreamBadResponse("Gemini sent a response without candidates")
    response_id = _response_id(data)
    choices = []
    for i, candidate in enumerate(data.get("candidates") or []):
        text, calls = _read_parts(candidate, response_id, i)
        finish = _finish(candidate.get("finishReason"), bool(calls))
        choices.append({"message": s.assistant_message(text, calls), "finish_reason": finish})
    if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
        choices.append({"message": s.assistant_message("", []), "finish_reason": "content_filter"})
    created = s.now() if created is None else created
    return s.completion(response_id, str(data.get("modelVersion", "")), created, choices,
                        _canonical_usage(data.get("usageMetadata")))


def _response_id(data: dict[str, Any]) -> str:
    return str(data.get("responseId") or s.stable_id("chatcmpl-", json.dumps(data, sort_keys=True)))


def _read_parts(candidate: dict[str, Any], response_id: str, index: int) -> tuple[str, list[dict[str, Any]]]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            text.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            calls.append(_canonical_call(part, s.stable_id("call_", response_id, index, len(calls))))
    return "".join(text), calls


def _canonical_call(part: dict[str, Any], default_id: str) -> dict[str, Any]:
    call = part["functionCall"]
    out = s.tool_call(call.get("id") or default_id, str(call.get("name", "")),
                      s.arguments_string(call.get("args")))
    if part.get("thoughtSignature"):
        out["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return out


def _finish(reason: str | None, has_calls: bool) -> str:
    finish = FINISH_TO_CANONICAL.get(reason or "STOP", "stop")
    return "tool_calls" if has_calls and finish == "stop" else finish


def _canonical_usage(metadata: dict[str, Any] | None) -> dict[str, Any]:
    metadata = metadata or {}
    thoughts = int(metadata.get("thoughtsTokenCount") or 0)
    return s.usage_body(int(metadata.get("promptTokenCount") or 0),
                        int(metadata.get("candidatesTokenCount") or 0) + thoughts,
                        cached=int(metadata.get("cachedContentTokenCount") or 0), reasoning=thoughts)


def upstream_error_message(data: Any) -> str | None:
    """The message in a Google API error body, if it is one."""
    if isinstance(data, list) and data:  # streamGenerateContent without alt=sse wraps it in an array
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    return str(error["message"]) if isinstance(error, dict) and error.get("message") else None


class UpstreamStreamMapper:
    """streamGenerateContent (``alt=sse``) events in, canonical chunks out. Gemini sends each function
    call whole, so every call becomes one tool-call delta with the next index; the event with a
    finishReason yields the finish chunk and the usage chunk (usageMetadata is cumulative)."""

    def __init__(self, *, created: int | None = None) -> None:
        self.created = created if created is not None else s.now()
        self.id, self.model = "", ""
        self.tool_calls = 0
        self.done = False

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if data.get("error"):
            raise UpstreamUnavailable(f"Gemini stream error: {upstream_error_message(data)}")
        out = []
        if not self.id:
            self.id = _response_id(data)
            self.model = str(data.get("modelVersion", ""))
            out.append(self._chunk({"role": "assistant", "content": ""}))
        candidates = data.get("candidates") or []
        candidate = candidates[0] if candidates else {}
        for part in (candidate.get("content") or {}).get("parts") or []:
            if part.get("thought"):
                continue
            if part.get("text"):
                out.append(self._chunk({"content": part["text"]}))
            elif isinstance(part.get("functionCall"), dict):
                call = _canonical_call(part, s.stable_id("call_", self.id, 0, self.tool_calls))
                delta = s.tool_call_delta(self.tool_calls, call["id"], call["function"]["name"],
                                          call["function"]["arguments"])
                if "extra_content" in call:
                    delta["extra_content"] = call["extra_content"]
                out.append(self._chunk({"tool_calls": [delta]}))
                self.tool_calls += 1
        blocked = not candidates and (data.get("promptFeedback") or {}).get("blockReason")
        if candidate.get("finishReason") or blocked:
            self.done = True
            finish = "content_filter" if blocked else _finish(candidate["finishReason"], self.tool_calls > 0)
            usage = _canonical_usage(data.get("usageMetadata"))
            out += [self._chunk({}, finish), s.usage_chunk(self.id, self.model, self.created, usage)]
        return out

    def close(self) -> list[dict[str, Any]]:
        if not self.done:
            raise UpstreamUnavailable("Gemini's stream ended without a finishReason")
        return []

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return s.chunk(self.id, self.model, self.created, delta, finish_reason)
