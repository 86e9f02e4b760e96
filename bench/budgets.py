"""The latency budget enforcement adds to one call at concurrency 1, on the real Redis and Postgres.

    .venv/bin/python bench/budgets.py                 # 3000 calls each way, interleaved
    .venv/bin/python bench/budgets.py --calls 1000

What it times is every step a budget adds on a call's path, done by the gateway's own code, against the
machine's Redis (DB 9, a unique key prefix) and a fresh Postgres database ``bench_budgets`` (migrated;
dropped afterwards) — no HTTP and no upstream, whose noise on this shared 2-core machine is larger than
what is measured:

* **without**: a key with no budget — ``BudgetGate.plan`` (finds none) + ``create.lua`` + the settle
  (``emit.lua``) + the answer's budget headers (none);
* **with**: a key with a budget (and a global one: two budget hashes) — ``plan`` (its worst case:
  the prompt estimate) + ``create.lua`` that checks and reserves in both (and returns what is left) +
  ``emit.lua`` that releases and charges both + the answer's remaining-budget headers (no round trip).

The two alternate call by call, so drift on the machine hits both alike; the difference of their
medians is the added latency (target ≤ 0.5 ms at concurrency 1).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis  # noqa: E402
from _stack import DEFAULT_ADMIN_DB_URL, DEFAULT_REDIS_URL, create_database, drop_database  # noqa: E402

from api.budget_gate import BudgetGate  # noqa: E402
from common.budgets import BudgetFields, remaining_headers  # noqa: E402
from common.contract import JobSpec, JobState, Mode, Result  # noqa: E402
from common.db import make_session_factory, migrate  # noqa: E402
from common.jobs import JobStore, new_job_id  # noqa: E402
from common.registry import Model, Price  # noqa: E402
from common.types import ChatRequest  # noqa: E402

TARGET_ADDED_MS = 0.5
REQUEST = ChatRequest(model="m", max_tokens=64,
                      messages=[{"role": "user", "content": "hello from the budget benchmark " * 4}])
MODEL = Model(provider="fake", model="fake-model", price=Price(input=Decimal("1.0"), output=Decimal("2.0")))


def one_call(gate: BudgetGate, store: JobStore, key: str) -> float:
    """One call's budget-related path, as the API and the worker run it; seconds."""
    started = time.perf_counter()
    plan = gate.plan(REQUEST, MODEL, key, max_cost=None, max_wait=60)
    job_id = new_job_id()
    spec = JobSpec.of(plan.request, mode=Mode.SYNC, model="fake-model", provider="fake", api_key_id=key)
    gate.create(plan, lambda budget: store.create(job_id, spec, max_wait=60, reply_to="", ttl=120,
                                                  budget=budget))
    store.emit(job_id, Result({}, {}), final_state=JobState.SUCCEEDED, charge=(1234, 30))
    remaining_headers(plan.reservation, "0.0000001234", 30)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    db_name = "bench_budgets"
    url = create_database(DEFAULT_ADMIN_DB_URL, db_name).replace("postgresql://", "postgresql+psycopg://")
    prefix = "benchbud" + secrets.token_hex(4)
    client = redis.Redis.from_url(DEFAULT_REDIS_URL)
    try:
        migrate(url)
        store = JobStore(client, prefix)
        gate = BudgetGate(store, make_session_factory(url), task_time_limit=600)
        for fields in (BudgetFields(name="key", scope="key", key_id="anonymous", period="monthly",
                                    limit_usd=Decimal(1000)),
                       BudgetFields(name="all", scope="global", period="daily", limit_usd=Decimal(1000))):
            gate.rows.create(fields)
        with_budget: Callable[[], float] = lambda: one_call(gate, store, "anonymous")   # noqa: E731
        # a key with no budget of its own still has the global one: drop it for the "without" side
        budgets = gate.book.applicable("anonymous")
        without_gate = BudgetGate(store, make_session_factory(url), task_time_limit=600)
        without_gate.book.applicable = lambda key: []   # type: ignore[method-assign]
        without: Callable[[], float] = lambda: one_call(without_gate, store, "nobody")   # noqa: E731
        assert len(budgets) == 2
        for _ in range(200):   # warm-up: connections, the Lua scripts, tiktoken-free estimates
            with_budget()
            without()
        a, b = [], []
        for _ in range(args.calls):
            b.append(with_budget())
            a.append(without())
        p50a, p50b = statistics.median(a) * 1000, statistics.median(b) * 1000
        p99a = statistics.quantiles(a, n=100)[98] * 1000
        p99b = statistics.quantiles(b, n=100)[98] * 1000
        print("| path | p50 ms | p99 ms |\n| --- | --- | --- |\n"
              f"| without a budget | {p50a:.3f} | {p99a:.3f} |\n"
              f"| with two budgets (key + global) | {p50b:.3f} | {p99b:.3f} |\n"
              f"| **added** | **{p50b - p50a:.3f}** | {p99b - p99a:.3f} |")
        verdict = "meets" if p50b - p50a <= TARGET_ADDED_MS else "MISSES"
        print(f"\nadded p50 {p50b - p50a:.3f} ms: {verdict} the {TARGET_ADDED_MS} ms target "
              f"({args.calls} calls each)")
        figures = gate.state.figures(budgets)
        assert all(f.reserved == 0 for f in figures), figures   # every reservation was released
    finally:
        for key in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(key)
        drop_database(DEFAULT_ADMIN_DB_URL, db_name)


if __name__ == "__main__":
    main()
