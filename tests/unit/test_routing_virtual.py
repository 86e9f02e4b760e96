"""Virtual models (common/routing/virtual.py): eligibility, each strategy's ranking, overrides, the
decision record. Tables of candidates → choice; latency comes from an in-memory table."""

from decimal import Decimal
from typing import get_args

import pytest

from common.errors import InvalidRequest
from common.registry import RegistryError, RoutingStrategy, parse_registry
from common.routing.virtual import (
    STRATEGIES,
    Contender,
    MeasuredLatency,
    Overrides,
    VirtualRouter,
    parse_overrides,
    pop_overrides,
    rank,
)
from common.types import ChatRequest

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
CODE = "```python\ndef add(a, b):\n    return a - b\n```"
SIMPLE = "What is the capital of France?"
MEDIUM = f"What does this do?\n{CODE}"                               # code → medium
HARD = f"Debug this and explain why it fails, step by step:\n{CODE}"  # code + reasoning → large

DOC = {
    "providers": {"local": {"kind": "mock"}, "cloud": {"kind": "mock"}, "premium": {"kind": "mock"},
                  "nokey": {"kind": "openai", "base_url": "https://x/v1", "api_key_env": "UNSET_KEY"}},
    "models": {
        "small": {"provider": "local", "model": "s", "tier": "small", "context_window": 4096,
                  "capabilities": ["chat"], "price": {"input": 0, "output": 0}},
        "mid": {"provider": "cloud", "model": "m", "tier": "medium", "context_window": 32768,
                "capabilities": ["chat", "tools", "json"], "price": {"input": 0.5, "output": 1.5}},
        "big": {"provider": "premium", "model": "b", "tier": "large", "context_window": 128000,
                "max_output_tokens": 8192, "capabilities": ["chat", "tools", "vision", "json"],
                "price": {"input": 5, "output": 15}},
        "gone": {"provider": "nokey", "model": "g", "tier": "large", "context_window": 128000,
                 "capabilities": ["chat", "tools", "vision", "json"], "price": {"input": 0.1, "output": 0.1}},
        "embedder": {"provider": "cloud", "model": "e", "capabilities": ["embeddings"]},
    },
    "virtual_models": {"auto": {}, "fast": {"strategy": "fastest"}, "cheap": {"strategy": "cheapest"},
                       "pair": {"strategy": "quality", "candidates": ["small", "mid"]}},
}
REGISTRY = parse_registry(DOC, {})


def chat(text="hi", **extra):
    return ChatRequest.model_validate({"model": "auto", "messages": [{"role": "user", "content": text}],
                                       **extra})


def router(latency=None):
    return VirtualRouter(REGISTRY, MeasuredLatency(latency or {}))


# id, virtual model, strategy override, request, measured TTFT (ms), expected alias
CHOICES = [
    ("auto-simple-to-small", "auto", None, chat(SIMPLE), {}, "small"),
    ("auto-medium-to-mid", "auto", None, chat(MEDIUM), {}, "mid"),
    ("auto-hard-to-big", "auto", None, chat(HARD), {}, "big"),
    ("auto-simple-tools-skips-small", "auto", None, chat(SIMPLE, tools=[TOOL]), {}, "mid"),
    ("auto-image-only-big", "auto", None, chat([{"type": "text", "text": "what?"}, IMAGE]), {}, "big"),
    ("auto-json-skips-small", "auto", None, chat(SIMPLE, response_format={"type": "json_object"}), {}, "mid"),
    ("auto-context-skips-small", "auto", None, chat("word " * 4000), {}, "mid"),
    ("auto-hard-but-cost", "auto", "cost", chat(HARD), {}, "small"),
    ("auto-simple-but-quality", "auto", "quality", chat(SIMPLE), {}, "big"),
    ("auto-latency-fast-mid", "auto", "latency", chat(SIMPLE), {"small": 900, "mid": 100, "big": 800}, "mid"),
    ("auto-latency-unmeasured-loses", "auto", "latency", chat(SIMPLE), {"mid": 400}, "mid"),
    ("auto-balanced-slow-small-still-wins", "auto", None, chat(SIMPLE), {"small": 300, "mid": 200}, "small"),
    ("auto-hard-big-though-slowest", "auto", None, chat(HARD), {"small": 5, "mid": 5, "big": 300}, "big"),
    ("auto-medium-mid-though-unmeasured", "auto", None, chat(MEDIUM), {"small": 5, "big": 5}, "mid"),
    ("cheap-free-small", "cheap", None, chat(HARD), {}, "small"),
    ("cheap-tools-mid", "cheap", None, chat(SIMPLE, tools=[TOOL]), {}, "mid"),
    ("cheap-context-needs-mid", "cheap", None, chat(SIMPLE, max_tokens=5000), {}, "mid"),
    ("fast-measured", "fast", None, chat(SIMPLE), {"small": 500, "mid": 50, "big": 120}, "mid"),
    ("fast-nothing-measured-cheapest", "fast", None, chat(SIMPLE), {}, "small"),
    ("fast-only-big-measured", "fast", None, chat(SIMPLE), {"big": 2000}, "big"),
    ("fast-override-cheapest", "fast", "cheapest", chat(SIMPLE), {"mid": 10, "small": 900}, "small"),
    ("listed-candidates-only", "pair", None, chat(SIMPLE), {}, "mid"),
]


@pytest.mark.parametrize("virtual,strategy,request_,latency,alias", [c[1:] for c in CHOICES],
                         ids=[c[0] for c in CHOICES])
def test_each_strategy_picks_what_the_table_says(virtual, strategy, request_, latency, alias):
    decision = router(latency).resolve(virtual, request_, Overrides(strategy=strategy))
    assert decision.alias == alias, decision


def test_unroutable_and_incapable_candidates_are_skipped_with_reasons():
    decision = router().resolve("auto", chat(SIMPLE, tools=[TOOL]))
    assert decision.skipped == {"small": "lacks tools", "gone": "provider nokey not configured"}
    assert "embedder" not in decision.ranked and "embedder" not in decision.skipped  # not a chat model
    assert decision.ranked == ("mid", "big")


MISSING = [
    ("vision-and-json", "pair",
     chat([{"type": "text", "text": "x"}, IMAGE], response_format={"type": "json_object"}),
     ["small lacks vision, json", "mid lacks vision"]),
    ("context", "pair", chat("hi", max_tokens=40000),
     ["small lacks context window 4096 <", "mid lacks context window 32768 <"]),
    ("max-output", "auto", chat([{"type": "text", "text": "x"}, IMAGE], tools=[TOOL], max_tokens=20000),
     ["small lacks tools, vision, context window", "mid lacks vision",
      "big lacks max output 8192 < max_tokens 20000", "gone provider nokey not configured"]),
]


@pytest.mark.parametrize("virtual,request_,phrases", [m[1:] for m in MISSING], ids=[m[0] for m in MISSING])
def test_none_eligible_is_a_400_naming_what_is_missing(virtual, request_, phrases):
    with pytest.raises(InvalidRequest) as caught:
        router().resolve(virtual, request_)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "model", "no_eligible_model")
    for phrase in phrases:
        assert phrase in caught.value.message


def test_preferred_provider_ranks_first_and_says_when_it_cannot():
    met = router().resolve("auto", chat(SIMPLE), Overrides(prefer_provider="premium"))
    assert (met.alias, met.preference_met) == ("big", True)
    assert "prefer=premium" in met.header()
    unmet = router().resolve("auto", chat(SIMPLE, tools=[TOOL]), Overrides(prefer_provider="local"))
    assert (unmet.alias, unmet.preference_met) == ("mid", False)
    assert "prefer=local (none eligible)" in unmet.header()


def test_decision_says_virtual_alias_strategy_and_tier():
    decision = router().resolve("auto", chat(HARD))
    assert decision.header() == "virtual=auto; alias=big; strategy=balanced; tier=large; score=4"
    record = decision.as_dict()
    assert {k: record[k] for k in ("virtual_model", "alias", "strategy", "tier")} == {
        "virtual_model": "auto", "alias": "big", "strategy": "balanced", "tier": "large"}
    assert record["ranked"][0] == "big"


def test_latency_is_read_only_when_the_strategy_weighs_it():
    class Counting(MeasuredLatency):
        reads: list = []

        def snapshot(self, aliases):
            self.reads.append(list(aliases))
            return self

    source = Counting({})
    VirtualRouter(REGISTRY, source).resolve("cheap", chat(SIMPLE))
    assert source.reads == []
    VirtualRouter(REGISTRY, source).resolve("fast", chat(SIMPLE))
    assert source.reads == [["small", "mid", "big"]]


OVERRIDES = [
    ("none", {}, {}, Overrides()),
    ("header-strategy", {}, {"x-routing-strategy": "cost"}, Overrides(strategy="cost")),
    ("body-wins", {"x-routing-strategy": "quality"}, {"x-routing-strategy": "cost"},
     Overrides(strategy="quality")),
    ("prefer-header", {}, {"x-prefer-provider": "cloud"}, Overrides(prefer_provider="cloud")),
    ("both-in-body", {"x-routing-strategy": "latency", "x-prefer-provider": "local"}, {},
     Overrides("latency", "local")),
    ("empty-strings-are-unset", {}, {"x-prefer-provider": ""}, Overrides()),
]


@pytest.mark.parametrize("body,headers,expected", [o[1:] for o in OVERRIDES], ids=[o[0] for o in OVERRIDES])
def test_overrides_parse(body, headers, expected):
    assert parse_overrides(body, headers, REGISTRY) == expected


BAD_OVERRIDES = [
    ("unknown-strategy", {"x-routing-strategy": "fancy"}, {}, "x-routing-strategy"),
    ("strategy-not-a-string", {"x-routing-strategy": 3}, {}, "x-routing-strategy"),
    ("unknown-provider-header", {}, {"x-prefer-provider": "nowhere"}, "x-prefer-provider"),
    ("provider-a-list", {"x-prefer-provider": ["local"]}, {}, "x-prefer-provider"),
]


@pytest.mark.parametrize("body,headers,field", [b[1:] for b in BAD_OVERRIDES],
                         ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_overrides_are_a_400_naming_the_field(body, headers, field):
    with pytest.raises(InvalidRequest) as caught:
        parse_overrides(body, headers, REGISTRY)
    assert caught.value.param == field and field in caught.value.message


def test_override_fields_are_taken_out_of_the_body():
    body = {"model": "auto", "x-routing-strategy": "cost", "x-prefer-provider": "cloud", "messages": []}
    assert pop_overrides(body) == {"x-routing-strategy": "cost", "x-prefer-provider": "cloud"}
    assert body == {"model": "auto", "messages": []}
    assert pop_overrides([1, 2]) == {}


def test_every_registry_strategy_has_weights():
    assert set(STRATEGIES) == set(get_args(RoutingStrategy))


BAD_REGISTRIES = [
    ("name-of-an-alias", {"small": {}}, "has the name of a model alias"),
    ("unknown-candidate", {"auto": {"candidates": ["nope"]}}, "unknown candidates"),
    ("unknown-strategy", {"auto": {"strategy": "fancy"}}, "strategy"),
    ("unknown-field", {"auto": {"strategy": "cost", "tiers": 3}}, "tiers"),
]


@pytest.mark.parametrize("section,phrase", [b[1:] for b in BAD_REGISTRIES],
                         ids=[b[0] for b in BAD_REGISTRIES])
def test_registry_refuses_bad_virtual_models(section, phrase):
    with pytest.raises(RegistryError, match=phrase):
        parse_registry({**DOC, "virtual_models": section}, {})


def test_bad_tier_is_refused():
    models = {**DOC["models"], "small": {**DOC["models"]["small"], "tier": "huge"}}
    with pytest.raises(RegistryError, match="tier"):
        parse_registry({**DOC, "models": models}, {})


def contender(alias, tier="medium", cost="1", ttft=None, provider="p"):
    model = REGISTRY.models["mid"].model_copy(update={"alias": alias, "tier": tier})
    return Contender(model, provider, Decimal(cost), ttft)


# id, contenders, strategy, classifier tier, preferred provider, expected order
RANKINGS = [
    ("cheapest-by-price", [contender("a", cost="3"), contender("b", cost="1"), contender("c", cost="2")],
     "cheapest", "small", None, ["b", "c", "a"]),
    ("cheapest-tie-more-capable", [contender("a", "small"), contender("b", "large")], "cheapest", "small",
     None, ["b", "a"]),
    ("cheapest-tie-then-name", [contender("b"), contender("a")], "cheapest", "small", None, ["a", "b"]),
    ("fastest-measured-first", [contender("a", ttft=90), contender("b"), contender("c", ttft=30)],
     "fastest", "small", None, ["c", "a", "b"]),
    ("fastest-none-measured-cheapest", [contender("a", cost="2"), contender("b", cost="1")], "fastest",
     "small", None, ["b", "a"]),
    ("quality-large-first", [contender("s", "small", "0"), contender("l", "large", "9"),
                             contender("m", "medium", "3")], "quality", "small", None, ["l", "m", "s"]),
    ("balanced-fit-over-price", [contender("s", "small", "0"), contender("l", "large", "9"),
                                 contender("m", "medium", "3")], "balanced", "medium", None, ["m", "s", "l"]),
    ("cost-cheap-even-when-hard", [contender("s", "small", "0"), contender("l", "large", "9")], "cost",
     "large", None, ["s", "l"]),
    ("latency-fit-breaks-even", [contender("s", "small", ttft=100), contender("l", "large", ttft=100)],
     "latency", "large", None, ["l", "s"]),
    ("preferred-first-whatever-the-rank", [contender("a", cost="1"), contender("b", cost="5", provider="q")],
     "cheapest", "small", "q", ["b", "a"]),
]


@pytest.mark.parametrize("contenders,strategy,tier,prefer,order", [r[1:] for r in RANKINGS],
                         ids=[r[0] for r in RANKINGS])
def test_rankings(contenders, strategy, tier, prefer, order):
    ranked = rank(contenders, STRATEGIES[strategy], tier, prefer)
    assert [c.model.alias for c in ranked] == order


def test_candidates_outside_the_callers_scope_are_skipped():
    decision = router().resolve("auto", chat(SIMPLE), allowed=lambda alias: alias != "small")
    assert decision.alias == "mid" and decision.skipped["small"] == "not allowed for this API key"
