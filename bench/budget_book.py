"""What a caller pays for the API's budget book: the call that finds the book older than its ttl,
before (it re-read every budget from Postgres itself: ``rows.all()`` with the pool's pre-ping) and now
(it starts the refresh in the background and goes on), against a real Postgres with N budgets.

    .venv/bin/python bench/budget_book.py --database postgresql+psycopg://postgres@127.0.0.1:5432/DB \\
        [--budgets 0 100] [--refreshes 200]

The database must be migrated (``common.db.migrate``); the budgets made here are deleted at the end.
Under gevent, as the API runs (the refresh is a greenlet): wall time of the caller's ``applicable()``,
quantiles over refreshes.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.budgetrows import BudgetBook, BudgetRows  # noqa: E402
from common.budgets import BudgetFields  # noqa: E402
from common.db import make_session_factory  # noqa: E402


def quantiles(values: list[float]) -> str:
    values = sorted(values)
    p50, p99, top = statistics.median(values), values[int(len(values) * 0.99)], values[-1]
    return f"p50 {p50 * 1e3:7.3f} ms  p99 {p99 * 1e3:7.3f} ms  max {top * 1e3:7.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--refreshes", type=int, default=200)
    opts = parser.parse_args()
    rows = BudgetRows(make_session_factory(opts.database, pool_size=2))
    made: list[str] = []
    try:
        for count in opts.budgets:
            while len(made) < count:
                made.append(rows.create(BudgetFields(name=f"bench{len(made)}", period="daily",
                                                     limit_usd="1", scope="global")).id)
            rows.all()   # the pool's connection made
            before = []
            for _ in range(opts.refreshes):
                start = time.perf_counter()
                rows.all()       # what the caller that found the book stale did before
                before.append(time.perf_counter() - start)
            book = BudgetBook(rows, ttl=0.0)
            book.applicable(None)
            now = []
            for _ in range(opts.refreshes):
                while book._lock.locked():   # the last refresh done: this call starts the next
                    time.sleep(0.0005)
                start = time.perf_counter()
                book.applicable(None)
                now.append(time.perf_counter() - start)
            print(f"{count:4d} budgets  before: {quantiles(before)}")
            print(f"{count:4d} budgets  now:    {quantiles(now)}")
    finally:
        for budget_id in made:
            rows.delete(budget_id)


if __name__ == "__main__":
    main()
