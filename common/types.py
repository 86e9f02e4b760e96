"""The canonical request and response that travel between API and workers.

Every ingress protocol translates *to* :class:`ChatRequest`, every provider adapter translates *from*
it, and back via :class:`ChatResponse`. The shape follows OpenAI Chat Completions, the lingua franca
the other formats already map onto; fields we do not model travel in ``extra`` so OpenAI-family
upstreams still receive them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

log = logging.getLogger(__name__)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's plain text (text parts joined), for echoing and token estimates."""
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return ""


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: dict[str, Any]


class ChatRequest(BaseModel):
    """A validated chat call. ``model`` is the gateway alias until an adapter swaps in the provider's name."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def upstream_body(self, provider_model: str) -> dict[str, Any]:
        """The OpenAI-format body to send upstream: the provider's model name, no unset fields."""
        body = self.model_dump(exclude_none=True)
        body["model"] = provider_model
        if not body.get("stream"):
            body.pop("stream", None)
        return body


class EmbeddingsRequest(BaseModel):
    """An OpenAI embeddings call (``POST /v1/embeddings``); the canonical form for all ingresses."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        """The inputs as text (token arrays are counted, not decoded), for token estimates."""
        if isinstance(self.input, str):
            return [self.input]
        return [item if isinstance(item, str) else " " * (3 * (len(item) if isinstance(item, list) else 1))
                for item in self.input]

    def upstream_body(self, provider_model: str) -> dict[str, Any]:
        body = self.model_dump(exclude_none=True)
        body["model"] = provider_model
        return body


# No single call is billed more tokens than this: a larger count is an upstream's bug, not a bill
# (and 3e9 would not even fit the usage table's old integer columns)
MAX_CALL_TOKENS = 1_000_000_000


def sane_token_count(value: Any, what: str = "tokens") -> int:
    """An upstream's token count as a billable number: a whole number in ``0..MAX_CALL_TOKENS``.
    Negative, non-numeric or non-finite counts become 0, larger ones the ceiling — each with a warning,
    since the upstream's accounting is wrong and someone should look."""
    try:
        count = int(value) if value is not None and not isinstance(value, bool) else 0
    except (TypeError, ValueError, OverflowError):  # "abc", NaN, infinity, a list
        log.warning("upstream reported %s=%.100r, not a count: billed as 0", what, value)
        return 0
    if count < 0:
        log.warning("upstream reported %s=%d: billed as 0", what, count)
        return 0
    if count > MAX_CALL_TOKENS:
        log.warning("upstream reported %s=%d: billed as %d", what, count, MAX_CALL_TOKENS)
        return MAX_CALL_TOKENS
    return count


class Usage(BaseModel):
    """What a call cost, in tokens; counts are made sane (:func:`sane_token_count`) on the way in, so
    every adapter's, and every stream's, usage is clamped in this one place."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @field_validator("prompt_tokens", "completion_tokens", mode="before")
    @classmethod
    def _sane(cls, value: Any, info: ValidationInfo) -> int:
        return sane_token_count(value, str(info.field_name))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatResponse(BaseModel):
    """An upstream's answer: ``body`` is an OpenAI ChatCompletion object; ``usage`` what it cost."""

    body: dict[str, Any]
    usage: Usage
    # the provider said its quota is spent for this long (rate-limit headers); 0 = no such signal
    quota_reset_s: float = 0.0
    # a relayed stream's time to its first chunk (None: not a stream; the whole call's time is the TTFT)
    first_token_ms: float | None = None
