"""Building blocks the Anthropic, Ollama and Gemini translators share. Pure functions, no I/O.

* Canonical output: OpenAI ``chat.completion`` bodies and ``chat.completion.chunk`` dicts. A canonical
  stream produced by an ``UpstreamStreamMapper`` is: a role chunk, content / tool-call delta chunks, one
  chunk with ``finish_reason``, then one chunk with ``usage`` and no choices (the shape OpenAI sends with
  ``stream_options.include_usage``; the gateway always needs usage for accounting).
* Canonical input: :class:`ToolCallBuffer` and :func:`choice_delta` read such chunks back, for the
  ``StreamRenderer`` of formats that send whole tool calls (Ollama, Gemini).
* Tool arguments: OpenAI carries them as a JSON *string*, the others as an *object*.
* Body validation: small checks that raise :class:`InvalidRequest` naming the wire-format parameter.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from common.errors import InvalidRequest
from common.protocols.openai import parse_chat_request
from common.types import ChatRequest, ChatResponse, Usage

# ---- canonical output ------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


def usage_body(prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """An OpenAI ``usage`` object. ``cached`` and ``reasoning`` are already included in the totals."""
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def completion(completion_id: str, model: str, created: int, choices: list[dict[str, Any]],
               usage: dict[str, Any]) -> ChatResponse:
    """A canonical response from OpenAI ``choices`` entries (``message`` + ``finish_reason``)."""
    body = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "logprobs": None, **choice} for i, choice in enumerate(choices)],
            "usage": usage}
    return ChatResponse(body=body, usage=Usage(prompt_tokens=usage["prompt_tokens"],
                                               completion_tokens=usage["completion_tokens"]))


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` entry."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_message(text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """An OpenAI assistant message; like OpenAI, content is null when the reply is only tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chunk(chunk_id: str, model: str, created: int, delta: dict[str, Any] | None = None,
          finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]}


def usage_chunk(chunk_id: str, model: str, created: int, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage}


def tool_call_delta(index: int, call_id: str | None = None, name: str | None = None,
                    arguments: str = "") -> dict[str, Any]:
    """One entry of a chunk's ``delta.tool_calls``; the first for a call carries its id and name."""
    delta: dict[str, Any] = {"index": index}
    if call_id is not None:
        delta["id"] = call_id
        delta["type"] = "function"
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function = {"name": name, **function}
    delta["function"] = function
    return delta


# ---- canonical input --------------------------------------------------------------------------------


def choice_delta(canonical_chunk: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The delta and finish reason of choice 0 (the formats we render have no ``n``)."""
    for choice in canonical_chunk.get("choices") or []:
        if choice.get("index", 0) == 0:
            return choice.get("delta") or {}, choice.get("finish_reason")
    return {}, None


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, completion, cached prompt) tokens of an OpenAI usage object."""
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached)


class ToolCallBuffer:
    """Collects streamed OpenAI tool-call fragments by ``index`` into whole calls, for formats that
    can only send complete calls. Fragments of parallel calls may interleave."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            call = self._calls.setdefault(int(delta.get("index", 0)), {"id": None, "name": "", "args": []})
            function = delta.get("function") or {}
            if delta.get("id"):
                call["id"] = delta["id"]
            if function.get("name"):
                call["name"] = function["name"]  # some servers repeat the name in every fragment
            if function.get("arguments"):
                call["args"].append(function["arguments"])
            if delta.get("extra_content"):
                call["extra_content"] = delta["extra_content"]

    def __bool__(self) -> bool:
        return bool(self._calls)

    def drain(self) -> list[dict[str, Any]]:
        """The collected calls as OpenAI ``tool_calls`` entries, in index order; empties the buffer."""
        calls = []
        for index in sorted(self._calls):
            call = self._calls[index]
            entry: dict[str, Any] = {"id": call["id"] or f"call_{index}", "type": "function",
                                     "function": {"name": call["name"], "arguments": "".join(call["args"])}}
            if "extra_content" in call:
                entry["extra_content"] = call["extra_content"]
            calls.append(entry)
        self._calls.clear()
        return calls


# ---- tool calls, images -----------------------------------------------------------------------------


def arguments_object(arguments: str | None) -> dict[str, Any]:
    """OpenAI's JSON-string arguments as the object the other formats want. Anything that is not a
    JSON object (models do emit broken JSON) is kept verbatim under ``_raw_arguments``."""
    if not arguments or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_raw_arguments": arguments}


def arguments_string(arguments: Any) -> str:
    """An arguments object as OpenAI's compact JSON string (a string passes through unchanged)."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False, separators=(",", ":"))


def stable_id(prefix: str, *seed: object) -> str:
    """An id for things the wire format leaves unnamed (Ollama's and Gemini's tool calls, Ollama's
    responses): the same seed always gives the same id, so a replayed stream keeps its ids."""
    return prefix + hashlib.sha256("\x00".join(map(str, seed)).encode()).hexdigest()[:24]


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)$", re.DOTALL)

# Base64 prefixes of image magic numbers: PNG, JPEG, GIF, WEBP (RIFF).
_IMAGE_PREFIXES = (("iVBORw0KGgo", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"),
                   ("UklGR", "image/webp"))


def split_data_url(url: str) -> tuple[str, str] | None:
    """``(mime type, base64 data)`` of a ``data:…;base64,…`` URL, or None for any other URL."""
    match = _DATA_URL.match(url)
    return (match["mime"], match["data"]) if match else None


def data_url(mime: str, data: str) -> str:
    return f"data:{mime};base64,{data}"


def sniff_image_mime(data: str) -> str:
    """The image type of base64 data by its magic number (formats that send bare base64 say nothing)."""
    for prefix, mime in _IMAGE_PREFIXES:
        if data.startswith(prefix):
            return mime
    return "image/png"


def image_url_of(part: dict[str, Any], param: str) -> str:
    """The URL of an OpenAI ``image_url`` content part."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise invalid(f"{param}.image_url", "expected an object with a non-empty 'url'")
    return url


def part_text(content: str | list[dict[str, Any]] | None, separator: str = "") -> str:
    """The text of a message content (string or OpenAI parts), text parts joined."""
    if isinstance(content, str):
        return content
    return separator.join(str(p.get("text", "")) for p in content or [] if p.get("type") == "text")


def function_messages_unsupported(role: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"messages with role '{role}' cannot be translated for this provider; use "
                          "'tool_calls' and role 'tool'", param=f"{param}.role", code="unsupported_value")


def file_data(part: dict[str, Any], param: str) -> tuple[str, str]:
    """``(mime type, base64 data)`` of an OpenAI ``file`` part; only inline ``file_data`` translates."""
    data = split_data_url(str((part.get("file") or {}).get("file_data") or ""))
    if data is None:
        raise unsupported("a file part without inline 'file_data'", f"{param}.file")
    return data


# ---- body validation --------------------------------------------------------------------------------

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object"}


def expect(value: Any, kind: type | tuple[type, ...], param: str, *, required: bool = False) -> Any:
    """``value`` if it has the expected JSON type; None if it is absent (null) and optional."""
    if value is None:
        if required:
            raise InvalidRequest(f"missing required parameter: '{param}'", param=param,
                                 code="missing_required_parameter")
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise invalid(param, f"expected {expected}")
    return value


def field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], param: str, *,
          required: bool = False) -> Any:
    """``obj[key]`` checked by :func:`expect`."""
    return expect(obj.get(key), kind, param, required=required)


def number(value: Any, param: str, low: float, high: float | None = None) -> Any:
    """A number (or None) within ``[low, high]``."""
    value = expect(value, (int, float), param)
    if value is not None and (value < low or (high is not None and value > high)):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise invalid(param, f"must be {bounds}")
    return value


def objects(value: Any, param: str) -> list[dict[str, Any]]:
    """A JSON array whose items are all objects."""
    if not isinstance(value, list):
        raise invalid(param, "expected an array")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid(f"{param}.{i}", "expected an object")
    return value


def strings(value: Any, param: str) -> list[str]:
    """A string or an array of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise invalid(param, "expected an array of strings")


def invalid(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"invalid value for '{param}': {problem}", param=param, code="invalid_value")


def unsupported(what: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{what} is not supported by this gateway", param=param, code="unsupported_value")


def canonical_request(payload: dict[str, Any]) -> ChatRequest:
    """Validate the translated body as a canonical request (errors name canonical parameters)."""
    request, _ = parse_chat_request(payload)
    return request
