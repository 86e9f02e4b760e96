"""A stream cut off mid-way — its caller left, or the upstream broke off after chunks went out — is
billed for what it produced, not $0: its error carries the usage (the upstream's own figures if it sent
them, else the prompt as estimated and the produced text counted), which becomes its try's usage row
and its budgets' charge (``workers/runner.py``)."""

from __future__ import annotations

from typing import Any

from common.errors import GatewayError
from common.registry import Model
from common.tokens import counter_for, estimate_prompt_tokens
from common.types import ChatRequest, ChatResponse, Usage

_PARTIAL = "partial_usage"   # the attribute a cut-off stream's error carries its produced usage in


def chunk_text(chunk: dict[str, Any]) -> list[str]:
    """The text a canonical chunk adds to the answer (content and tool-call arguments)."""
    out = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            out.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            out.extend(str(function.get(k) or "") for k in ("name", "arguments"))
    return out


def with_partial(error: GatewayError, request: ChatRequest, model: Model, usage: dict[str, Any],
                  produced: list[str]) -> GatewayError:
    """Mark a stream cut off after chunks went out with what it used: the upstream's own usage if it
    sent one, else the prompt as estimated and the produced text counted (``common/tokens.py``)."""
    count, _ = counter_for(model)
    prompt = int(usage.get("prompt_tokens") or 0) or estimate_prompt_tokens(request, model)
    completion = int(usage.get("completion_tokens") or 0) or count("".join(produced))
    setattr(error, _PARTIAL, Usage(prompt_tokens=prompt, completion_tokens=completion))
    return error


def partial_bill(error: GatewayError, model: Model) -> dict[str, Any]:
    """``_usage_row`` arguments billing a cut-off stream what it produced; {} for any other error."""
    usage: Usage | None = getattr(error, _PARTIAL, None)
    if usage is None:
        return {}
    return {"response": ChatResponse(body={}, usage=usage),
            "cost": model.price.cost(usage.prompt_tokens, usage.completion_tokens)}
