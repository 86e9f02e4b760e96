"""Budgets at the API: which apply to a call, its worst case against them and the per-request cap,
the 402 when one refuses it, and what the answer's headers and ``GET /v1/budget`` say about them.

The check itself is not here: it is the same Redis step that creates and queues the job
(``create.lua``, via :meth:`BudgetGate.create`), so concurrent calls cannot both take the last of a
budget. This module decides what to reserve and turns a refusal into an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import sessionmaker

from common.budgetrows import Budget, BudgetBook, BudgetRows
from common.budgets import (
    BudgetRefusal,
    Reservation,
    Window,
    WorstCase,
    cap_completion,
    usd_text,
    window,
    worst_case,
)
from common.budgetstate import BudgetState, Figures
from common.errors import BudgetExceeded, InvalidRequest, ServiceUnavailable
from common.jobs import JobStore
from common.registry import Model
from common.types import ChatRequest, EmbeddingsRequest

LAPSE_MARGIN_S = 60.0   # a reservation outlives its job's deadline + task time limit by this much
COLD_RETRIES = 3        # a budget hash rebuilt this many times in a row and still missing: 503


@dataclass(frozen=True)
class Plan:
    """A call's budget admission: the request as it will be sent (capped), what to reserve and where."""

    request: ChatRequest | EmbeddingsRequest
    reservation: Reservation | None
    budgets: tuple[Budget, ...] = ()
    windows: tuple[Window, ...] = ()


class BudgetGate:
    """One per API process."""

    def __init__(self, store: JobStore, sessions: sessionmaker, task_time_limit: float,
                 served_by: Callable[[Model], list[Model]] = lambda model: [model]) -> None:
        self.served_by = served_by  # every deployment (and fallback) the call may end up on
        self.rows = BudgetRows(sessions)
        self.book = BudgetBook(self.rows)
        self.lapse_after_s = task_time_limit + LAPSE_MARGIN_S
        self.state = BudgetState(store, self.rows, lapse_after_s=self.lapse_after_s)

    def plan(self, request: ChatRequest | EmbeddingsRequest, model: Model, api_key_id: str | None, *,
             max_cost: Decimal | None, max_wait: float) -> Plan:
        """What the call reserves: nothing without budgets or a cap (the request as it is); else its
        worst case (:func:`common.budgets.worst_case`), refused at once with a 400 if it is above
        ``max_cost`` — before anything is queued — and the request capped to the completion budget
        the worst case assumed."""
        budgets = self.book.applicable(api_key_id)
        if not budgets and max_cost is None:
            return Plan(request, None)
        capped = cap_completion(request, model)
        # routing may place or move the job on any deployment of the alias or of its fallbacks, each
        # with its own price: the worst case is the dearest of them, so no move can overshoot
        each = [worst_case(capped, served) for served in self.served_by(model)]
        worst = WorstCase(max(w.units for w in each), max(w.tokens for w in each))
        if max_cost is not None and worst.usd > max_cost:
            raise InvalidRequest(f"this call may cost up to ${usd_text(worst.units)} (its prompt and "
                                 f"max_tokens at the model's prices), above its max_cost_usd of ${max_cost}; "
                                 "lower max_tokens or raise the cap", param="max_cost_usd",
                                 code="max_cost_exceeded")
        if not budgets:
            return Plan(capped, None)
        now = datetime.now(UTC)
        windows = tuple(window(b.period, now) for b in budgets)
        keys = tuple(self.state.key(b, w) for b, w in zip(budgets, windows, strict=True))
        lapse_ms = int((max_wait + self.lapse_after_s) * 1000)
        return Plan(capped, Reservation(keys, worst, lapse_ms), tuple(budgets), windows)

    def create(self, plan: Plan, create: Callable[[Reservation | None], object]) -> None:
        """Run ``create`` (the job's creation, which reserves in the same Redis step); a budget whose
        hash is missing is rebuilt from Postgres and the creation tried again; a budget that refuses
        the call raises :class:`BudgetExceeded` (nothing was queued)."""
        for _ in range(COLD_RETRIES):
            try:
                create(plan.reservation)
                return
            except BudgetRefusal as refusal:
                budget, period = plan.budgets[refusal.index], plan.windows[refusal.index]
                if refusal.kind == "cold":
                    self.state.rebuild(budget, period)
                    continue
                assert plan.reservation is not None
                raise exceeded(budget, period, Figures.of(refusal.numbers), plan.reservation.worst) from None
        raise ServiceUnavailable("budget state could not be rebuilt; retry shortly", retry_after=1)

    def describe_all(self, budgets: list[Budget]) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        return [describe(b, window(b.period, now), f)
                for b, f in zip(budgets, self.state.figures(budgets, now), strict=True)]


def describe(budget: Budget, period: Window, figures: Figures) -> dict[str, Any]:
    """A budget and its figures this period, as the APIs show them."""
    return {"id": budget.id, "object": "budget", "name": budget.name, "scope": budget.scope,
            "key_id": budget.key_id, "period": budget.period,
            "limit_usd": None if budget.limit_usd is None else usd_text(figures.limit),
            "spent_usd": usd_text(figures.spent), "reserved_usd": usd_text(figures.reserved),
            "remaining_usd": None if figures.remaining is None else usd_text(figures.remaining),
            "limit_tokens": budget.limit_tokens, "spent_tokens": figures.tspent,
            "reserved_tokens": figures.treserved, "remaining_tokens": figures.tremaining,
            "thresholds": list(budget.thresholds),
            "period_start": None if period.end is None else _iso(period.start),
            "resets_at": None if period.end is None else _iso(period.end)}


def exceeded(budget: Budget, period: Window, figures: Figures, worst: WorstCase) -> BudgetExceeded:
    """The 402 for a call budget ``budget`` refused: the budget, its period, spent, limit, reset."""
    resets = "never (a lifetime budget)" if period.end is None else _iso(period.end)
    who = "the whole gateway" if budget.scope == "global" else f"key {budget.key_id}"
    if figures.limit >= 0 and figures.spent + figures.reserved + worst.units > figures.limit:
        numbers = (f"spent ${usd_text(figures.spent)} and ${usd_text(figures.reserved)} reserved by calls in "
                   f"flight of its ${usd_text(figures.limit)} limit; this call may cost up to "
                   f"${usd_text(worst.units)}")
    else:
        numbers = (f"spent {figures.tspent} tokens and {figures.treserved} reserved by calls in flight of "
                   f"its {figures.tlimit}-token limit; this call may use up to {worst.tokens}")
    error = BudgetExceeded(f"budget '{budget.name}' ({budget.id}, {budget.period}, for {who}) does not allow "
                           f"this call: {numbers}. It resets at {resets}.")
    error.budget_id = budget.id
    error.resets_at = None if period.end is None else _iso(period.end)
    return error


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
