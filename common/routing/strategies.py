"""The routing strategies, as a table: each picks one option among the usable deployments of one
tier (``common/routing/__init__.first_tier``). Pure functions of what ``observe`` measured, with the
random source passed in (tests pass a seeded one). Ties go to a weighted draw among the tied.

==================  ==========================================================================
strategy            picks the deployment ...
==================  ==========================================================================
``weighted``        at random, in proportion to each deployment's ``weight``
``least-busy``      with the fewest jobs waiting for its provider (broker queue + line)
``lowest-latency``  with the lowest measured latency (decaying average); one never measured first
``cheapest``        with the lowest price (input + output per 1M tokens)
``earliest-start``  whose job would start soonest: its queue ÷ its completion rate, the estimate
                    Retry-After uses (default); a provider with jobs waiting and nothing completed
                    lately counts as last
==================  ==========================================================================

Adding a strategy is a function and a row in :data:`STRATEGIES`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from common.routing import Candidate, Load, first_tier, soonest_reopening

Option = tuple[Candidate, Load]
Strategy = Callable[[list[Option], random.Random], Option]
_TIE = 1e-9


def _weighted(options: list[Option], rng: random.Random) -> Option:
    if len(options) == 1:
        return options[0]
    return rng.choices(options, weights=[c.deployment.weight for c, _ in options])[0]


def _lowest(options: list[Option], rng: random.Random, key: Callable[[Option], float]) -> Option:
    best = min(key(o) for o in options)
    return _weighted([o for o in options if key(o) <= best + _TIE], rng)


def least_busy(options: list[Option], rng: random.Random) -> Option:
    return _lowest(options, rng, lambda o: float(o[1].waiting))


def lowest_latency(options: list[Option], rng: random.Random) -> Option:
    return _lowest(options, rng, lambda o: -1.0 if o[1].latency_ms is None else o[1].latency_ms)


def cheapest(options: list[Option], rng: random.Random) -> Option:
    def price(o: Option) -> float:
        p = o[0].deployment.price
        return 0.0 if p is None else float(p.input + p.output)
    return _lowest(options, rng, price)


def earliest_start(options: list[Option], rng: random.Random) -> Option:
    def start(o: Option) -> float:
        return math.inf if o[1].start_in_s is None else o[1].start_in_s
    soonest = [o for o in options if start(o) <= min(start(x) for x in options) + _TIE]
    return least_busy(soonest, rng)


STRATEGIES: dict[str, Strategy] = {
    "weighted": _weighted,
    "least-busy": least_busy,
    "lowest-latency": lowest_latency,
    "cheapest": cheapest,
    "earliest-start": earliest_start,
}
DEFAULT_STRATEGY = "earliest-start"


def choose(strategy: str, options: list[Option], rng: random.Random) -> tuple[Option, str] | None:
    """The option to use and the decision in words (``<strategy>`` or ``wait-for-probe``): the
    strategy's pick in the first tier with a usable deployment; if none is usable anywhere, the one
    whose breaker lets a probe through first (the job waits for it). None if there are no options."""
    tier = first_tier(options)
    if tier:
        return STRATEGIES[strategy](tier, rng), strategy
    reopening = soonest_reopening(options)
    return None if reopening is None else (reopening, "wait-for-probe")
