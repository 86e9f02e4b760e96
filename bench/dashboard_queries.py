"""What the dashboard's pages cost the database: each service query a page runs, over a day of usage rows.

    .venv/bin/python bench/dashboard_queries.py                  # 1,000,000 rows over the last 24 h
    .venv/bin/python bench/dashboard_queries.py --rows 200000 --rounds 9

A fresh database ``bench_dashboard`` (127.0.0.1:5432, user postgres) migrated to head; ``--rows`` usage
rows generated in one SQL statement over the last 24 hours (two tries per job, 50 keys, 8 models, 2 %
errors; the rollup trigger fills the rollups as they go in). Then each query the Overview and Requests
pages make is timed ``--rounds`` times, one at a time, after one warm-up: the median in ms. Prints a
markdown table; the database is dropped at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.db import make_session_factory, migrate  # noqa: E402
from common.requestlog import CallFilter, per_minute, recent_calls, summary  # noqa: E402
from common.usage import UsageQuery, report  # noqa: E402
from common.usage.query import ceil_hour, floor_hour  # noqa: E402

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NAME = "bench_dashboard"
ROWS_SQL = """
INSERT INTO usage (call_id, job_id, api_key_id, model, provider, provider_model, prompt_tokens,
                   completion_tokens, cost_usd, queue_wait_ms, upstream_latency_ms, outcome, status_code,
                   created_at)
SELECT 'c' || g, 'job_' || (g / 2), 'key_' || (g % 50), 'model-' || (g % 8), 'p' || (g % 4), 'pm',
       10 + g % 100, 20 + g % 200, 0.0001 * (g % 7), g % 500, 200 + g % 3000,
       CASE WHEN g % 50 = 0 THEN 'upstream_error' ELSE 'success' END, 200,
       now() - (g % 86400) * interval '1 second'
FROM generate_series(1, {rows}) g
"""


def timed(fn: Callable[[], object], rounds: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {NAME}")
        admin.execute(f"CREATE DATABASE {NAME}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{NAME}"
    try:
        migrate(url)
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            start = time.perf_counter()
            conn.execute(ROWS_SQL.format(rows=int(args.rows)))
            conn.execute("ANALYZE usage")
            print(f"{args.rows:,} rows in {time.perf_counter() - start:.1f} s\n")
        sessions = make_session_factory(url, pool_size=1)
        now = datetime.now(UTC)
        day, hour = timedelta(days=1), timedelta(hours=1)
        hours = UsageQuery(since=floor_hour(now) - 23 * hour, until=ceil_hour(now), group_by=("hour",))
        cases: list[tuple[str, Callable[[], object]]] = [
            ("Overview, last hour: summary (percentiles)", lambda: summary(sessions, now - hour, now)),
            ("Overview, last hour: per_minute charts", lambda: per_minute(sessions, now - hour, now)),
            ("Overview, 24 h: rollups (hour groups)", lambda: report(sessions, hours)),
            ("(not used) summary over 24 h of raw rows", lambda: summary(sessions, now - day, now)),
            ("Requests: 100 newest", lambda: recent_calls(sessions, CallFilter(now - day, limit=100))),
            ("Requests: one key", lambda: recent_calls(sessions, CallFilter(now - day, key="key_7",
                                                                           limit=100))),
            ("Requests: status=error", lambda: recent_calls(sessions, CallFilter(now - day, status="error",
                                                                                limit=100))),
        ]
        print("| query | median ms |\n| --- | ---: |")
        for name, fn in cases:
            print(f"| {name} | {timed(fn, args.rounds):.1f} |")
    finally:
        if not args.keep:
            with psycopg.connect(ADMIN, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")


if __name__ == "__main__":
    main()
