"""Budgets: what they are and the arithmetic of money, without I/O (table-tested in tests/unit).

A budget caps the spend of one API key (``scope: key``) or of the whole gateway (``scope: global``)
in USD and/or tokens per ``period``: ``daily``, ``weekly`` (from Monday), ``monthly`` — calendar-aligned
in UTC — or ``lifetime``. The live state (spent, reserved) is in Redis (``common/budgetstate.py``,
``common/lua/budget.lua``), the definitions and the alerts in Postgres (``common/budgetrows.py``).

Money in Redis is an integer count of :data:`UNIT` (1e-10 USD, the scale of the usage table's
``cost_usd``), so spent figures are exact sums of usage rows; Python and Postgres use ``Decimal``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import InvalidRequest
from common.registry import Model
from common.tokens import completion_budget, estimate_prompt_tokens, reservation
from common.types import ChatRequest, EmbeddingsRequest

UNIT = Decimal("0.0000000001")    # 1e-10 USD: Numeric(18, 10), the usage table's cost scale
UNITS_PER_USD = 10_000_000_000
PERIODS = ("daily", "weekly", "monthly", "lifetime")
Period = Literal["daily", "weekly", "monthly", "lifetime"]
Scope = Literal["global", "key"]
DEFAULT_THRESHOLDS = (80, 95)
MAX_USD = Decimal("900000")       # Redis compares units as doubles: exact below 2**53 units (~$900k)


def to_units(usd: Decimal, *, worst_case: bool = False) -> int:
    """USD as integer units. A real cost rounds half up, as Postgres stores it in the usage row (so
    Redis's sums equal the rows'); a worst case rounds up (a reservation is never short)."""
    return int(usd.quantize(UNIT, rounding=ROUND_CEILING if worst_case else ROUND_HALF_UP) * UNITS_PER_USD)


def from_units(units: int) -> Decimal:
    return (Decimal(units) / UNITS_PER_USD).quantize(UNIT)


def usd_text(units: int) -> str:
    """Units as a plain decimal string without trailing zeros ("0.0123")."""
    text = format(from_units(units).normalize(), "f")
    return text


@dataclass(frozen=True)
class Window:
    """One period of a budget: [start, end); ``end`` is None for a lifetime budget (it never resets)."""

    start: datetime
    end: datetime | None

    @property
    def tag(self) -> str:
        """The period's part of its Redis key: its start in epoch seconds ("0" for lifetime)."""
        return str(int(self.start.timestamp())) if self.end is not None else "0"


LIFETIME_START = datetime(1970, 1, 1, tzinfo=UTC)


def window(period: str, now: datetime) -> Window:
    """The calendar period (UTC) that ``now`` falls in: a day from 00:00, a week from Monday 00:00, a
    month from its 1st 00:00; lifetime from the epoch, never ending."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return Window(day, day + timedelta(days=1))
    if period == "weekly":
        start = day - timedelta(days=day.weekday())
        return Window(start, start + timedelta(days=7))
    if period == "monthly":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
            month=start.month + 1)
        return Window(start, end)
    if period == "lifetime":
        return Window(LIFETIME_START, None)
    raise ValueError(f"unknown period {period!r}")


@dataclass(frozen=True)
class WorstCase:
    """What a call may cost at most: units of USD and tokens (prompt estimate + completion budget)."""

    units: int
    tokens: int

    @property
    def usd(self) -> Decimal:
        return from_units(self.units)


def worst_case(request: ChatRequest | EmbeddingsRequest, model: Model) -> WorstCase:
    """The call's worst case: the prompt as ``common/tokens.py`` estimates it (exact for tiktoken's
    models, generous otherwise) at the input price, plus its completion budget (``max_tokens``, else
    the model's ``max_output_tokens``, else 1024 — which the gateway then sends as ``max_tokens``, see
    :func:`cap_completion`) at the output price; an embedding's inputs at the input price."""
    if isinstance(request, EmbeddingsRequest):
        tokens = reservation(request, model)
        return WorstCase(to_units(model.price.cost(tokens, 0), worst_case=True), tokens)
    prompt, completion = estimate_prompt_tokens(request, model), completion_budget(request, model)
    return WorstCase(to_units(model.price.cost(prompt, completion), worst_case=True), prompt + completion)


def cap_completion(request: ChatRequest | EmbeddingsRequest, model: Model) -> ChatRequest | EmbeddingsRequest:
    """A call under a budget must not produce more than its reservation counted: without a
    ``max_tokens`` of its own it is sent with the completion budget the worst case assumed."""
    if isinstance(request, EmbeddingsRequest) or request.max_tokens or request.max_completion_tokens:
        return request
    return request.model_copy(update={"max_tokens": completion_budget(request, model)})


def parse_max_cost(raw: object) -> Decimal | None:
    """The caller's per-request cap (``max_cost_usd`` body field, else ``x-gateway-max-cost``), in USD."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise InvalidRequest("max_cost_usd must be a number of USD", param="max_cost_usd")
    try:
        value = Decimal(str(raw).strip())
    except ArithmeticError:
        raise InvalidRequest(f"max_cost_usd must be a number of USD, got {raw!r}",
                             param="max_cost_usd") from None
    if not value.is_finite() or value < 0:
        raise InvalidRequest("max_cost_usd must be a non-negative number of USD", param="max_cost_usd")
    return value


class BudgetTerms(BaseModel):
    """What a budget allows, without whom it applies to: the ``budgets`` of an API key's body
    (``common/keyschema.py``) are these; :class:`BudgetFields` adds the scope."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    period: Period
    limit_usd: Decimal | None = Field(default=None, ge=0, le=MAX_USD)
    limit_tokens: int | None = Field(default=None, ge=0, le=2**53)
    thresholds: list[int] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS), max_length=10)

    @field_validator("limit_usd")
    @classmethod
    def _scale(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and (not value.is_finite() or value != value.quantize(UNIT)):
            raise ValueError("at most 10 decimal places")
        return value

    @field_validator("thresholds")
    @classmethod
    def _percent(cls, value: list[int]) -> list[int]:
        if any(not 1 <= pct <= 100 for pct in value):
            raise ValueError("each threshold is a percentage from 1 to 100")
        return sorted(set(value))

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetTerms:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ValueError("limit_usd: a budget needs limit_usd, limit_tokens or both")
        return self


class BudgetFields(BudgetTerms):
    """A budget as the admin API takes it (a PATCH sends any subset: see :func:`validate_budget`)."""

    scope: Scope = "key"
    key_id: str | None = Field(default=None, max_length=40)

    @model_validator(mode="after")
    def _consistent(self) -> BudgetFields:
        if self.scope == "key" and not self.key_id:
            raise ValueError("key_id: a key budget names its key")
        if self.scope == "global" and self.key_id:
            raise ValueError("key_id: a global budget applies to every key; leave key_id out")
        return self


def validate_budget(data: object, base: dict[str, object] | None = None) -> BudgetFields:
    """``data`` (over ``base``, a PATCH's current values) as a valid budget; else a 400 naming the field."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return BudgetFields.model_validate({**(base or {}), **data})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        field, _, detail = message.partition(": ") if not loc and ": " in message else (loc, "", message)
        raise InvalidRequest(f"invalid budget: {field}: {detail or message}", param=field or None) from None


class BudgetRefusal(Exception):
    """``create.lua`` did not admit a job because of budget ``index`` (0-based, in the order given):
    ``cold`` — its Redis state is missing (rebuild it, try again) — or ``over``, with its ``numbers``
    (spent, reserved, limit, tspent, treserved, tlimit; -1 = no limit)."""

    def __init__(self, kind: str, index: int, numbers: tuple[int, ...] = ()) -> None:
        super().__init__(f"budget {index}: {kind}")
        self.kind = kind
        self.index = index
        self.numbers = numbers


@dataclass(frozen=True)
class Reservation:
    """What ``create.lua`` reserves for a job: its worst case in each budget hash ``keys``, held at
    most ``lapse_ms`` (past that the job cannot be running any more; its reservation is refunded)."""

    keys: tuple[str, ...]
    worst: WorstCase
    lapse_ms: int
    #: filled in by the creation that reserved it: each budget's numbers after the reservation
    after: list[tuple[int, ...]] = field(default_factory=list, compare=False)

    def args(self) -> list[object]:
        return [len(self.keys), self.worst.units, self.worst.tokens, self.lapse_ms, *self.keys]


def remaining_headers(reservation: Reservation | None, cost_usd: object, tokens: object) -> dict[str, str]:
    """The answer's ``x-gateway-budget-remaining-usd`` / ``-tokens``: what is left of the tightest budget
    once this call settled — the numbers its creation saw after reserving, with its worst case given
    back and its real cost (``cost_usd``, ``tokens``) taken. Other calls in flight may move it since;
    ``GET /v1/budget`` reads the live figures."""
    if reservation is None or not reservation.after:
        return {}
    try:
        units = to_units(Decimal(str(cost_usd or 0)))
        used = int(str(tokens or 0))
    except (ArithmeticError, ValueError, TypeError):
        return {}
    worst = reservation.worst
    usd = [limit - spent - reserved + worst.units - units
           for spent, reserved, limit, *_ in reservation.after if limit >= 0]
    toks = [tlimit - tspent - treserved + worst.tokens - used
            for *_, tspent, treserved, tlimit in reservation.after if tlimit >= 0]
    out = {}
    if usd:
        out["x-gateway-budget-remaining-usd"] = usd_text(max(min(usd), 0))
    if toks:
        out["x-gateway-budget-remaining-tokens"] = str(max(min(toks), 0))
    return out
