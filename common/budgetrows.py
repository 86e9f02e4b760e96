"""Budgets in Postgres: their definitions (the admin API's CRUD), what was spent in a period (the truth
the Redis state is rebuilt from), and the alerts that fired. The only module that reads or writes the
``budgets`` and ``budget_alerts`` tables (migration ``0006_budgets``)."""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from common.apikeys import ANONYMOUS
from common.budgets import BudgetFields, BudgetTerms, Window, to_units
from common.db import ApiKey, Base, Usage
from common.errors import NotFound

log = logging.getLogger(__name__)

BOOK_TTL_S = 1.0   # an API process sees a new or deleted budget within this long (+ one query)
FORCED_WAIT_S = 5.0  # a call after forget() waits at most this long for a refresh already under way


class Budget(Base):
    __tablename__ = "budgets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    period: Mapped[str] = mapped_column(String(16))
    limit_usd: Mapped[Decimal | None] = mapped_column(Numeric(18, 10))
    limit_tokens: Mapped[int | None] = mapped_column(BigInteger)
    thresholds: Mapped[list[int]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    def fields(self) -> dict[str, Any]:
        """The editable fields, as a PATCH's base."""
        return {"name": self.name, "scope": self.scope, "key_id": self.key_id, "period": self.period,
                "limit_usd": self.limit_usd, "limit_tokens": self.limit_tokens,
                "thresholds": list(self.thresholds)}


class BudgetAlert(Base):
    """A soft threshold crossed: once per budget, period and threshold (the unique constraint makes it
    so even when Redis forgot that it fired), with its webhook delivery's progress."""

    __tablename__ = "budget_alerts"
    __table_args__ = (UniqueConstraint("budget_id", "period_start", "threshold", name="uq_budget_alert"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)   # the webhook-id
    budget_id: Mapped[str] = mapped_column(String(40))
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    threshold: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    fired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    delivery: Mapped[str] = mapped_column(String(16))   # none | pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Spent:
    units: int
    tokens: int


@dataclass
class KeySetChange:
    """What :meth:`BudgetRows.replace_key_set` did: budgets kept (as they were, as they are) and
    deleted. New ones need nothing in Redis: their state is built from Postgres at their first call."""

    kept: list[tuple[Budget, Budget]] = field(default_factory=list)
    removed: list[Budget] = field(default_factory=list)


class BudgetRows:
    """CRUD and the spend queries. Thread/greenlet-safe (it holds only a session factory)."""

    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def create(self, fields: BudgetFields) -> Budget:
        self._check_key(fields)
        budget = Budget(id="bud_" + secrets.token_hex(8), **fields.model_dump())
        with self.sessions.begin() as session:
            session.add(budget)
        return self.get(budget.id)

    def get(self, budget_id: str) -> Budget:
        with self.sessions() as session:
            budget = session.get(Budget, budget_id)
        if budget is None:
            raise NotFound(f"no budget with id '{budget_id}'", param="id", code="budget_not_found")
        return budget

    def all(self) -> list[Budget]:
        with self.sessions() as session:
            return list(session.scalars(select(Budget).order_by(Budget.created_at, Budget.id)))

    def update(self, budget_id: str, fields: BudgetFields) -> Budget:
        self._check_key(fields)
        with self.sessions.begin() as session:
            budget = session.get(Budget, budget_id)
            if budget is None:
                raise NotFound(f"no budget with id '{budget_id}'", param="id", code="budget_not_found")
            for name, value in fields.model_dump().items():
                setattr(budget, name, value)
            budget.updated_at = datetime.now(UTC)
        return self.get(budget_id)

    def delete(self, budget_id: str) -> Budget:
        budget = self.get(budget_id)
        with self.sessions.begin() as session:
            session.execute(delete(Budget).where(Budget.id == budget_id))
        return budget

    def of_key(self, key_id: str) -> list[Budget]:
        """The budgets of scope ``key`` for ``key_id``, oldest first (those made together: by name)."""
        with self.sessions() as session:
            return list(session.scalars(select(Budget).where(Budget.scope == "key", Budget.key_id == key_id)
                                        .order_by(Budget.created_at, Budget.name)))

    @staticmethod
    def replace_key_set(session: Session, key_id: str, terms: list[BudgetTerms]) -> KeySetChange:
        """In the caller's transaction, make ``key_id``'s budgets be ``terms``, matched by name: a kept
        name keeps its budget (id, spend, alerts) with the new terms, a new name is a new budget, a
        name not in ``terms`` is deleted. Returns what changed, for the Redis state."""
        existing = {b.name: b for b in session.scalars(
            select(Budget).where(Budget.scope == "key", Budget.key_id == key_id))}
        change = KeySetChange()
        for term in terms:
            fields = BudgetFields(scope="key", key_id=key_id, **term.model_dump()).model_dump()
            budget = existing.pop(term.name, None)
            if budget is None:
                session.add(Budget(id="bud_" + secrets.token_hex(8), **fields))
                continue
            before = Budget(id=budget.id, period=budget.period, scope=budget.scope, key_id=key_id)
            for name, value in fields.items():
                setattr(budget, name, value)
            budget.updated_at = datetime.now(UTC)
            change.kept.append((before, budget))
        for budget in existing.values():
            session.delete(budget)
            change.removed.append(budget)
        return change

    def _check_key(self, fields: BudgetFields) -> None:
        if fields.key_id is None or fields.key_id == ANONYMOUS:
            return
        with self.sessions() as session:
            if session.get(ApiKey, fields.key_id) is None:
                raise NotFound(f"no API key with id '{fields.key_id}'", param="key_id", code="key_not_found")

    # spend ----------------------------------------------------------------------------------------
    def spent(self, budget: Budget, window: Window, *, excluding: Iterable[str] = (),
              jobs: Iterable[str] = ()) -> tuple[Spent, dict[str, Spent]]:
        """What the usage rows of ``budget``'s scope created in ``window`` cost (leaving out the calls
        ``excluding`` names: the rebuild counts those from the usage stream), and of that, per job in
        ``jobs``. One transaction, so both come from the same snapshot."""
        scope = [Usage.created_at >= window.start]
        if window.end is not None:
            scope.append(Usage.created_at < window.end)
        if budget.scope == "key":
            scope.append(func.coalesce(Usage.api_key_id, ANONYMOUS) == budget.key_id)
        excluded = list(excluding)
        if excluded:
            scope.append(Usage.call_id.not_in(excluded))
        tokens = Usage.prompt_tokens + Usage.completion_tokens
        with self.sessions.begin() as session:
            cost, count = session.execute(select(func.coalesce(func.sum(Usage.cost_usd), 0),
                                                 func.coalesce(func.sum(tokens), 0)).where(*scope)).one()
            per_job: dict[str, Spent] = {}
            wanted = list(jobs)
            if wanted:
                for job_id, job_cost, job_tokens in session.execute(
                        select(Usage.job_id, func.sum(Usage.cost_usd), func.sum(tokens))
                        .where(*scope, Usage.job_id.in_(wanted)).group_by(Usage.job_id)):
                    per_job[job_id] = Spent(_units(job_cost), int(job_tokens))
        return Spent(_units(cost), int(count)), per_job

    # alerts ---------------------------------------------------------------------------------------
    def record_alert(self, budget_id: str, period_start: datetime, threshold: int, payload: dict[str, Any],
                     *, webhook: bool) -> str | None:
        """The alert's row, unless it fired already this period (None): its id is the webhook-id."""
        alert_id = "msg_" + secrets.token_hex(12)
        with self.sessions.begin() as session:
            inserted = session.execute(
                insert(BudgetAlert).values(id=alert_id, budget_id=budget_id, period_start=period_start,
                                           threshold=threshold, payload=payload, attempts=0,
                                           delivery="pending" if webhook else "none")
                .on_conflict_do_nothing(constraint="uq_budget_alert").returning(BudgetAlert.id)).first()
        return None if inserted is None else alert_id

    def delivery_attempt(self, alert_id: str, *, status: int | None, error: str | None,
                         done: str | None) -> None:
        """One webhook attempt: its HTTP status or error; ``done`` = delivered | failed if it was the last."""
        with self.sessions.begin() as session:
            alert = session.get(BudgetAlert, alert_id)
            if alert is None:
                return
            alert.attempts += 1
            alert.last_status, alert.last_error = status, error
            if done is not None:
                alert.delivery = done
                if done == "delivered":
                    alert.delivered_at = datetime.now(UTC)

    def alerts(self, budget_id: str) -> list[BudgetAlert]:
        with self.sessions() as session:
            return list(session.scalars(select(BudgetAlert).where(BudgetAlert.budget_id == budget_id)
                                        .order_by(BudgetAlert.fired_at)))


class BudgetBook:
    """Which budgets apply to a call, as an API process knows them: every budget, re-read from Postgres
    about every ``BOOK_TTL_S``, **off the request path** — a call uses the set in hand and, if it is
    older than the ttl, starts one refresh in the background (a greenlet under gevent) that the next
    calls see; no caller waits on Postgres (it is two round trips with the pool's pre-ping, and an
    unreachable or slow Postgres would hold the caller until its timeouts). A change is therefore seen
    within the ttl plus one query. Only the first load and the one after :meth:`forget` (this process
    changed a budget: the next call must see it) are waited for. If Postgres is unreachable the last
    good set stands (a budget is not lifted by an outage) and one warning says so, until a refresh
    succeeds again."""

    def __init__(self, rows: BudgetRows, ttl: float = BOOK_TTL_S) -> None:
        self.rows = rows
        self.ttl = ttl
        self._sets: tuple[list[Budget], dict[str, list[Budget]]] = ([], {})   # see _index
        self._loaded = -1e9
        self._must_wait = True   # never loaded, or forgotten: the next call loads before it goes on
        self._forgotten = 0      # bumped by forget(): a load that began before it does not count
        self._failing = False
        self._lock = threading.Lock()   # held by the one load under way

    def applicable(self, api_key_id: str | None) -> list[Budget]:
        if self._must_wait:
            # a refresh hung on an unreachable Postgres holds the lock: go on with the set in hand
            if self._lock.acquire(timeout=FORCED_WAIT_S):
                try:
                    if self._must_wait:
                        self._load(raise_first=True)
                finally:
                    self._lock.release()
        elif time.monotonic() - self._loaded > self.ttl and self._lock.acquire(blocking=False):
            _in_background(self._refresh)
        everyone, by_key = self._sets
        return list(by_key.get(api_key_id or ANONYMOUS, everyone))

    def forget(self) -> None:
        """Re-read before the next call goes on (this process changed a budget)."""
        self._forgotten += 1
        self._must_wait = True

    def _refresh(self) -> None:
        try:
            self._load(raise_first=False)
        finally:
            self._lock.release()

    def _load(self, *, raise_first: bool) -> None:
        """Read every budget; on a database error keep the last set (the very first load raises, if
        ``raise_first``: there is no set to keep) and try again after one ttl."""
        generation = self._forgotten
        try:
            budgets = self.rows.all()
        except SQLAlchemyError as exc:
            if raise_first and self._loaded < 0:
                raise
            if not self._failing:
                log.warning("budgets (Postgres) unreachable: the last known set applies (%s)",
                            type(exc).__name__)
            self._failing, self._must_wait = True, False
            self._loaded = time.monotonic()
            return
        self._sets = _index(budgets)
        self._loaded = time.monotonic()
        self._must_wait = self._forgotten != generation
        if self._failing:
            self._failing = False
            log.warning("budgets (Postgres) reachable again")


def _in_background(work: Callable[[], None]) -> None:
    """Run ``work`` beside the caller: a greenlet where gevent patched threading (the API under
    gunicorn) — a patched ``Thread.start()`` waits for the new greenlet to run until its first I/O,
    ~0.4 ms of ORM work on the caller's time — else a daemon thread."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        import gevent
        gevent.spawn(work)
    else:
        threading.Thread(target=work, name="budget-book", daemon=True).start()


def _index(budgets: list[Budget]) -> tuple[list[Budget], dict[str, list[Budget]]]:
    """The global budgets, and each key's budgets with the global ones, in the order read (creation):
    a call looks its list up instead of filtering every budget."""
    everyone: list[Budget] = []
    by_key: dict[str, list[Budget]] = {}
    for budget in budgets:
        if budget.scope == "global":
            everyone.append(budget)
            for own in by_key.values():
                own.append(budget)
        else:
            by_key.setdefault(budget.key_id or "", list(everyone)).append(budget)
    return everyone, by_key


def _units(value: Decimal | int) -> int:
    return to_units(Decimal(value))
