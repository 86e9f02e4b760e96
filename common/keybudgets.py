"""An API key together with its budgets: the ``budgets`` field of the admin API's key bodies and of
``llm-gateway keys create --budget``. The key (``common/apikeys.py``) and its budgets
(``common/budgetrows.py``) are written in one Postgres transaction — a bad budget creates no key — and
the budgets' Redis state follows as ``/admin/budgets`` makes it follow (``api/admin/budgets.py``): a
deleted budget's hash is dropped, a changed one takes its new terms at once (a lowered limit refuses the
next call on every process), a new one is built from Postgres at its first call.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from common.apikeys import KeyService
from common.budgetrows import Budget, BudgetBook, BudgetRows, KeySetChange
from common.budgetstate import BudgetState
from common.db import ApiKey
from common.keyschema import KeyCreate, KeyUpdate


class KeyBudgets:
    """``state``/``book`` None (a CLI without Redis): only creation is offered, which needs neither."""

    def __init__(self, keys: KeyService, rows: BudgetRows, state: BudgetState | None = None,
                 book: BudgetBook | None = None) -> None:
        self.keys, self.rows, self.state, self.book = keys, rows, state, book

    def create(self, body: KeyCreate) -> tuple[ApiKey, str]:
        """The key and, in the same transaction, its ``body.budgets``."""
        terms = body.budgets or []

        def add_budgets(session: Session, row: ApiKey) -> None:
            BudgetRows.replace_key_set(session, row.id, terms)

        row, secret = self.keys.create(body, add_budgets if terms else None)
        if terms and self.book is not None:
            self.book.forget()
        return row, secret

    def update(self, key_id: str, body: KeyUpdate) -> ApiKey:
        """The key's changes and, if ``budgets`` is given, its budget set replaced (by name; see
        :meth:`BudgetRows.replace_key_set`), in one transaction; then the Redis state follows."""
        if body.budgets is None:
            return self.keys.update(key_id, body)
        if self.state is None:
            raise RuntimeError("changing a key's budgets needs Redis (their live state is there)")
        terms, change = body.budgets, KeySetChange()

        def replace(session: Session, row: ApiKey) -> None:
            nonlocal change
            change = BudgetRows.replace_key_set(session, row.id, terms)

        row = self.keys.update(key_id, body, replace)
        for before, after in change.kept:
            if before.period != after.period:
                self.state.drop(before)   # another period: its state is rebuilt from Postgres
            self.state.set_terms(after)
        for gone in change.removed:
            self.state.drop(gone)
        if self.book is not None:
            self.book.forget()
        return row

    def of(self, key_id: str) -> list[Budget]:
        return self.rows.of_key(key_id)
