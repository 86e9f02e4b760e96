"""How many tokens a call will cost, before it is made — for TPM reservations.

The estimate is deliberately generous (it is settled against the provider's real usage after the
call): ``ceil(characters / 3)`` per message text plus 4 tokens of per-message framing and 3 for the
reply's priming, plus the completion budget — ``max_completion_tokens``/``max_tokens`` if the caller set
one, else the model's ``max_output_tokens``, else ``DEFAULT_COMPLETION_BUDGET``. English averages ~4
characters per token with OpenAI's tokenizers, so /3 over-reserves by about a third rather than
under-reserving and drawing upstream 429s. (tiktoken would be exact for OpenAI models, but it downloads
its vocabularies at first use, which an offline gateway host cannot do.)
"""

from __future__ import annotations

import json
import math

from common.registry import Model
from common.types import ChatRequest, EmbeddingsRequest

DEFAULT_COMPLETION_BUDGET = 1024
PER_MESSAGE = 4
PRIMING = 3


def estimate_prompt_tokens(request: ChatRequest) -> int:
    total = PRIMING
    for message in request.messages:
        text = message.text()
        if message.tool_calls:
            text += "".join(call.function.name + call.function.arguments for call in message.tool_calls)
        total += PER_MESSAGE + math.ceil(len(text) / 3)
    if request.tools:
        total += math.ceil(len(json.dumps([t.model_dump() for t in request.tools])) / 3)
    return total


def completion_budget(request: ChatRequest, model: Model) -> int:
    return (request.max_completion_tokens or request.max_tokens or model.max_output_tokens
            or DEFAULT_COMPLETION_BUDGET)


def reservation(request: ChatRequest | EmbeddingsRequest, model: Model) -> int:
    """Tokens to reserve against TPM before the call (embeddings produce no completion tokens)."""
    if isinstance(request, EmbeddingsRequest):
        return sum(math.ceil(len(text) / 3) + 1 for text in request.texts())
    return estimate_prompt_tokens(request) + completion_budget(request, model)
