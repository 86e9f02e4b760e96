"""What other parts of the gateway call to record what they decide — routing (breakers, fallbacks),
budgets and the response cache. Each is one call with bounded arguments; the metric names are in
docs/metrics.md. Safe to call from any process (API or worker)."""

from __future__ import annotations

from collections.abc import Collection

from common.observability.labels import OTHER, bounded
from common.observability.metrics import metrics

#: a breaker's state as the gauge's value
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
FALLBACK_REASONS = frozenset({"breaker_open", "unavailable", "rate_limited", "timeout", "error"})


def breaker_state(provider: str, state: str, providers: Collection[str]) -> None:
    """Provider's circuit breaker is now ``state`` (closed | half_open | open)."""
    m = metrics()
    m.of(m.breaker_state, bounded(provider, providers)).set(BREAKER_STATES.get(state, -1))


def fallback(model: str, from_provider: str, to_provider: str, reason: str, *, models: Collection[str],
             providers: Collection[str]) -> None:
    """A job moved from one deployment of its route to the next (reason: see FALLBACK_REASONS)."""
    m = metrics()
    m.of(m.fallbacks, bounded(model, models), bounded(from_provider, providers),
         bounded(to_provider, providers), reason if reason in FALLBACK_REASONS else OTHER).inc()


def budget_remaining(budget: str, remaining_usd: float, budgets: Collection[str]) -> None:
    """What is left of a budget (named by the operator: bounded by the configured budgets)."""
    m = metrics()
    m.of(m.budget_remaining_usd, bounded(budget, budgets)).set(remaining_usd)


def cache_lookup(model: str, hit: bool, models: Collection[str]) -> None:
    """One response-cache lookup, hit or miss."""
    m = metrics()
    m.of(m.cache, bounded(model, models), "hit" if hit else "miss").inc()
