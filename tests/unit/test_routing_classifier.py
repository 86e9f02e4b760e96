"""The complexity classifier: a table of prompts → tier (common/routing/classifier.py)."""

import time

import pytest

from common.routing.classifier import LARGE_FROM, MEDIUM_FROM, SIGNALS, classify, tier_of
from common.types import ChatRequest

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
CODE = "```python\ndef add(a, b):\n    return a - b\n```"
LONG = "The quick brown fox jumps over the lazy dog. " * 200   # ~2,250 tokens


def user(text, **extra):
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


def turns(n):
    msgs = []
    for i in range(n):
        msgs += [{"role": "user", "content": f"and then {i}?"}, {"role": "assistant", "content": "ok"}]
    return {"model": "auto", "messages": msgs}


PROMPTS = [
    # id, request, tier, signals that fired
    ("greeting", user("hi"), "small", {}),
    ("fact", user("What is the capital of France?"), "small", {}),
    ("arithmetic", user("what is 12 * 7"), "small", {"math": 1}),
    ("programming-word", user("Which python version added match?"), "small", {"code": 1}),
    ("one-tool", user("Weather in Paris?", tools=[TOOL]), "small", {"tools": 1}),
    ("long-system-prompt-short-ask", {"model": "auto", "messages": [
        {"role": "system", "content": "be terse. " * 100}, {"role": "user", "content": "hi"}]},
     "small", {}),
    ("code-block", user(f"What does this do?\n{CODE}"), "medium", {"code": 2}),
    ("image-and-tool", user([{"type": "text", "text": "what is this?"}, IMAGE], tools=[TOOL]), "medium",
     {"tools": 1, "images": 1}),
    ("proof", user("Prove that the square root of 2 is irrational."), "medium", {"math": 2}),
    ("deep-conversation", turns(10), "medium", {"depth": 2}),
    ("long-document", user("Summarise:\n" + LONG), "medium", {"length": 2}),
    ("debug-code", user(f"Debug this and explain why it fails, step by step:\n{CODE}"), "large",
     {"code": 2, "reasoning": 2}),
    ("proof-step-by-step", user("Prove step by step that the integral of 1/x is ln x"), "medium",
     {"math": 2, "reasoning": 1}),
    ("design-tradeoffs", user("Design a sharded queue, analyse the trade-offs and compare with Kafka."),
     "medium", {"reasoning": 2}),
    ("everything", user(f"{LONG}\nRefactor this, analyse the trade-offs of the design:\n{CODE}",
                        tools=[TOOL], response_format={"type": "json_schema", "json_schema": {}}), "large",
     {"length": 2, "code": 2, "reasoning": 2, "tools": 1, "schema": 1}),
]


@pytest.mark.parametrize("body,tier,signals", [p[1:] for p in PROMPTS], ids=[p[0] for p in PROMPTS])
def test_prompts_get_their_tier(body, tier, signals):
    verdict = classify(ChatRequest.model_validate(body))
    assert (verdict.tier, verdict.signals) == (tier, signals)
    assert verdict.score == sum(signals.values())


def test_same_request_same_verdict():
    request = ChatRequest.model_validate(PROMPTS[-1][1])
    assert len({repr(classify(request)) for _ in range(5)}) == 1


BANDS = [("zero", 0, "small"), ("below-medium", MEDIUM_FROM - 1, "small"), ("medium", MEDIUM_FROM, "medium"),
         ("below-large", LARGE_FROM - 1, "medium"), ("large", LARGE_FROM, "large"), ("far", 20, "large")]


@pytest.mark.parametrize("score,tier", [b[1:] for b in BANDS], ids=[b[0] for b in BANDS])
def test_score_bands(score, tier):
    assert tier_of(score) == tier


def test_every_signal_is_documented():
    import common.routing.classifier as module
    for name in SIGNALS:
        assert f"\n    {name} " in module.__doc__


HOSTILE = [
    ("newlines", "\n" * 400_000),
    ("digits", "1" * 400_000),
    ("spaces-at-line-start", ("\n" + " " * 1000) * 400),
    ("semicolons-and-spaces", ("; " + " " * 50) * 8000),
    ("from-without-import", ("from " + "x" * 90 + " ") * 4000),
    ("keywords", "analysis design step by step " * 15_000),
]


@pytest.mark.parametrize("text", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_text_is_classified_in_linear_time(text):
    """Hundreds of kilobytes of the worst shapes for each pattern: a pattern that backtracks per position
    would take minutes; the signals read a bounded tail, so this is milliseconds."""
    request = ChatRequest.model_validate({"model": "auto", "messages": [{"role": "user", "content": text}]})
    started = time.perf_counter()
    classify(request)
    assert time.perf_counter() - started < 1.0


def test_content_signals_read_the_tail_of_the_user_text():
    """Code far before the end of a long prompt is not seen; the same code at its end is."""
    filler = "words " * 5_000  # 30,000 characters: more than SCAN_CHARS
    assert "code" not in classify(ChatRequest.model_validate(user(f"{CODE}\n{filler}"))).signals
    assert classify(ChatRequest.model_validate(user(f"{filler}\n{CODE}"))).signals["code"] == 2


def test_cplusplus_counts_as_code():
    assert classify(ChatRequest.model_validate(user("is c++ hard?"))).signals == {"code": 1}
