"""Routing (common/routing): deployments in the registry, the candidate chain, and the strategies."""

from __future__ import annotations

import random

import pytest

from common.registry import RegistryError, parse_registry
from common.routing import BreakerState, Candidate, Load, candidates, serving
from common.routing.strategies import choose

ENV = {"K": "k"}


def provider(url: str) -> dict:
    return {"kind": "openai", "base_url": url, "api_key_env": "K"}


DOC = {
    "providers": {"a": provider("http://a/v1"), "b": provider("http://b/v1"), "c": provider("http://c/v1"),
                  "dark": {"kind": "openai", "base_url": "http://d/v1", "api_key_env": "UNSET"}},
    "models": {
        "old": {"provider": "a", "model": "m"},
        "multi": {"deployments": [{"provider": "a", "model": "m", "weight": 3},
                                  {"provider": "b", "model": "m2", "price": {"input": 1, "output": 1},
                                   "context_window": 1000},
                                  {"provider": "dark", "model": "m"}],
                  "price": {"input": 5, "output": 5}, "context_window": 100_000, "fallbacks": ["fb"]},
        "fb": {"provider": "c", "model": "big", "fallbacks": ["multi", "old"]},
    },
}


def test_a_single_provider_alias_is_one_deployment_as_before():
    model = parse_registry(DOC, ENV).models["old"]
    assert (model.provider, model.model) == ("a", "m")
    assert [d.name for d in model.routes()] == ["a/m"]


def test_deployments_inherit_the_alias_values_they_do_not_set():
    model = parse_registry(DOC, ENV).models["multi"]
    first, second, _ = model.routes()
    assert (model.provider, model.model) == ("a", "m")   # the first deployment names the alias
    assert (first.price.input, first.context_window, first.weight) == (5, 100_000, 3)
    assert (second.price.input, second.context_window) == (1, 1000)
    served = model.on(second)
    assert (served.provider, served.model, served.context_window) == ("b", "m2", 1000)


def test_candidates_follow_the_chain_once_and_skip_unroutable_and_unfit():
    registry = parse_registry(DOC, ENV)
    chain = [(c.alias, c.name, c.fallback) for c in candidates(registry, "multi")]
    assert chain == [("multi", "a/m", False), ("multi", "b/m2", False), ("fb", "c/big", True),
                     ("old", "a/m", True)]   # dark has no key; multi is not visited twice
    fits = [c.name for c in candidates(registry, "multi", lambda m, d: (d.context_window or 0) > 5000)]
    assert fits == ["a/m", "c/big", "a/m"]


BAD = [
    ("both-forms", {"provider": "a", "model": "m", "deployments": [{"provider": "b", "model": "m"}]},
     "either provider/model or deployments"),
    ("neither", {"context_window": 10}, "needs provider and model"),
    ("unknown-deployment-provider", {"deployments": [{"provider": "zz", "model": "m"}]}, "unknown provider"),
    ("same-twice", {"deployments": [{"provider": "a", "model": "m"}, {"provider": "a", "model": "m"}]},
     "same deployment twice"),
    ("bad-strategy", {"provider": "a", "model": "m", "routing": "fastest"}, "unknown routing strategy"),
    ("bad-fallback", {"provider": "a", "model": "m", "fallbacks": ["nope"]}, "not another model alias"),
    ("self-fallback", {"provider": "a", "model": "m", "fallbacks": ["x"]}, "not another model alias"),
    ("zero-weight", {"deployments": [{"provider": "a", "model": "m", "weight": 0}]}, "greater than 0"),
]


@pytest.mark.parametrize("model,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_the_registry_refuses_bad_routing_at_start_up(model, message):
    doc = {"providers": DOC["providers"], "models": {"x": model}}
    with pytest.raises(RegistryError, match=message):
        parse_registry(doc, ENV)


def opt(name: str, *, weight: float = 1, price: float = 0, alias: str = "m", fallback: bool = False,
        **load) -> tuple[Candidate, Load]:
    registry = parse_registry({"providers": {name: provider("http://x/v1")}, "models": {alias: {
        "deployments": [{"provider": name, "model": "x", "weight": weight,
                         "price": {"input": price, "output": price}}]}}}, ENV)
    return Candidate(alias, registry.models[alias].routes()[0], fallback), Load(**load)


OPEN = {"breaker": BreakerState.OPEN, "reopens_in_s": 5.0}
STRATEGY_CASES = [
    # (id, strategy, options, the provider it picks)
    ("least-busy", "least-busy", [opt("a", waiting=5), opt("b", waiting=2)], "b"),
    ("lowest-latency", "lowest-latency", [opt("a", latency_ms=300.0), opt("b", latency_ms=120.0)], "b"),
    ("lowest-latency-explores-unmeasured", "lowest-latency", [opt("a", latency_ms=50.0), opt("b")], "b"),
    ("cheapest", "cheapest", [opt("a", price=3), opt("b", price=0.5)], "b"),
    ("earliest-start", "earliest-start", [opt("a", start_in_s=4.0), opt("b", start_in_s=0.5)], "b"),
    ("earliest-start-unknown-rate-last", "earliest-start",
     [opt("a", start_in_s=None, waiting=9), opt("b", start_in_s=30.0)], "b"),
    ("earliest-start-tie-goes-to-least-busy", "earliest-start", [opt("a", waiting=3), opt("b", waiting=1)],
     "b"),
    ("open-breaker-is-out", "cheapest", [opt("a", **OPEN), opt("b", price=9)], "b"),
    ("half-open-with-a-free-probe-is-in", "earliest-start",
     [opt("a", breaker=BreakerState.HALF_OPEN, start_in_s=0.0), opt("b", start_in_s=9.0)], "a"),
    ("half-open-probe-taken-is-out", "earliest-start",
     [opt("a", breaker=BreakerState.HALF_OPEN, probe_free=False), opt("b", start_in_s=9.0)], "b"),
    ("fallback-only-when-the-alias-has-none", "earliest-start",
     [opt("a", **OPEN), opt("f", alias="fb", fallback=True)], "f"),
    ("own-alias-before-a-cheaper-fallback", "cheapest",
     [opt("a", price=9), opt("f", alias="fb", fallback=True)], "a"),
    ("all-open-waits-for-the-first-probe", "earliest-start",
     [opt("a", breaker=BreakerState.OPEN, reopens_in_s=8.0),
      opt("b", breaker=BreakerState.OPEN, reopens_in_s=2.0)], "b"),
]


@pytest.mark.parametrize("strategy,options,expected", [c[1:] for c in STRATEGY_CASES],
                         ids=[c[0] for c in STRATEGY_CASES])
def test_strategies_pick_what_the_table_says(strategy, options, expected):
    picked = choose(strategy, options, random.Random(1))
    assert picked is not None and picked[0][0].provider == expected


def test_all_open_is_a_wait_for_the_probe_decision():
    picked = choose("earliest-start", [opt("a", **OPEN)], random.Random(1))
    assert picked is not None and picked[1] == "wait-for-probe"
    assert choose("earliest-start", [], random.Random(1)) is None


def test_weighted_follows_the_weights():
    rng = random.Random(7)
    options = [opt("a", weight=3), opt("b", weight=1)]
    picks = [choose("weighted", options, rng)[0][0].provider for _ in range(4000)]  # type: ignore[index]
    assert 0.7 < picks.count("a") / len(picks) < 0.8


def test_an_alias_is_served_while_any_deployment_is_routable():
    doc = {"providers": DOC["providers"], "models": {
        "later": {"deployments": [{"provider": "dark", "model": "m"}, {"provider": "b", "model": "m"}]},
        "never": {"provider": "dark", "model": "m"}}}
    registry = parse_registry(doc, ENV)
    assert registry.serves(registry.models["later"]) and not registry.serves(registry.models["never"])
    assert [c.name for c in candidates(registry, "later")] == ["b/m"]


@pytest.mark.parametrize(("deployment", "provider", "expected"), [
    ("b/m2", "b", "b/m2"),
    (None, "b", "b/m2"),
    (None, "a", "a/m"),
    (None, "nowhere", "a/m"),
    ("gone/x", "b", "b/m2"),
], ids=["named", "row-on-second-provider", "row-on-first", "unknown-provider-first",
        "unknown-name-by-provider"])
def test_serving_finds_the_deployment_a_spec_or_its_row_names(deployment, provider, expected):
    model = parse_registry(DOC, ENV).models["multi"]
    assert serving(model, deployment, provider).name == expected
