"""The API process's budget book (``common/budgetrows.BudgetBook``) against a real Postgres, reached
through a TCP proxy that a test hangs or cuts: a call never waits on the book's refresh — with Postgres
hung, calls still get the last set at once — a change made elsewhere shows within the ttl once Postgres
answers, an outage is one warning (and one when it ends), and ``forget()`` makes the next call see this
process's own change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from common.budgetrows import BudgetBook, BudgetRows
from common.budgets import BudgetFields
from common.db import make_session_factory
from tests.faults import TcpProxy
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

TTL = 0.2


@pytest.fixture
def proxy(database_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(database_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as p:
        yield p


@pytest.fixture
def rows(database_url: str) -> Iterator[BudgetRows]:
    """Direct to Postgres: what an operator's change on another process writes."""
    direct = BudgetRows(make_session_factory(psycopg3(database_url), pool_size=2))
    yield direct
    for budget in direct.all():
        direct.delete(budget.id)


def psycopg3(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def book_through(proxy: TcpProxy, database_url: str) -> BudgetBook:
    sessions = make_session_factory(psycopg3(proxy.url(database_url)), pool_size=2)
    return BudgetBook(BudgetRows(sessions), ttl=TTL)


def global_budget(name: str) -> BudgetFields:
    return BudgetFields(name=name, period="daily", limit_usd="1", scope="global")


def names(book: BudgetBook) -> set[str]:
    return {b.name for b in book.applicable(None)}


def answers_at_once(book: BudgetBook) -> set[str]:
    """``applicable`` from another thread; it must return while Postgres is hung (else it waited)."""
    out: list[set[str]] = []
    caller = threading.Thread(target=lambda: out.append(names(book)), daemon=True)
    caller.start()
    caller.join(timeout=10)
    assert out, "a call waited on the book's refresh"
    return out[0]


def said(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in message for message in caplog.messages)


def test_calls_never_wait_on_a_hung_postgres_and_see_changes_when_it_answers(proxy, rows, database_url):
    rows.create(global_budget("first"))
    book = book_through(proxy, database_url)
    assert names(book) == {"first"}            # the first load is waited for
    proxy.cut(mode="hang")
    try:
        rows.create(global_budget("second"))
        for _ in range(5):                     # each past the ttl: the refresh hangs, calls do not
            time.sleep(TTL * 1.5)
            assert answers_at_once(book) == {"first"}
    finally:
        proxy.restore()
    wait_until(lambda: names(book) == {"first", "second"}, timeout=10, interval=0.05)


def test_an_outage_keeps_the_last_set_with_one_warning(proxy, rows, database_url, caplog):
    rows.create(global_budget("kept"))
    book = book_through(proxy, database_url)
    assert names(book) == {"kept"}
    caplog.set_level(logging.WARNING, logger="common.budgetrows")
    proxy.cut(mode="reset")
    try:
        wait_until(lambda: names(book) == {"kept"} and said(caplog, "unreachable"), timeout=10, interval=0.05)
        for _ in range(5):
            time.sleep(TTL * 1.5)
            assert names(book) == {"kept"}
    finally:
        proxy.restore()
    wait_until(lambda: names(book) == {"kept"} and said(caplog, "reachable again"), timeout=10, interval=0.05)
    assert said(caplog, "unreachable") == 1, caplog.messages


def test_forget_makes_the_next_call_see_this_process_change(proxy, rows, database_url):
    book = BudgetBook(rows, ttl=3600)
    assert names(book) == set()
    rows.create(global_budget("mine"))
    assert names(book) == set()                # within the ttl: the set in hand
    book.forget()
    assert names(book) == {"mine"}
