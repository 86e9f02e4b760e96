"""TPM reservations: exact tiktoken counts for OpenAI models (offline, from the bundled vocabularies),
the characters/3 estimate for the rest, plus the completion budget."""

from __future__ import annotations

import pytest

from common.registry import Model
from common.tokens import DEFAULT_COMPLETION_BUDGET, estimate_prompt_tokens, reservation
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
