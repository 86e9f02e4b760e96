"""The usage & billing API over 1,000,000 usage rows, and what keeping the rollups costs the usage flush.

    .venv/bin/python bench/usage_api.py                    # 1M rows over 30 days, 300 requests per report
    .venv/bin/python bench/usage_api.py --rows 200000 --requests 100 --flush-rows 10000

1. A fresh database ``bench_usage`` (127.0.0.1:5432, user postgres) migrated to head; ``--rows`` usage
   rows generated in SQL (``generate_series``) over the last ``--days`` days: ``--keys`` keys, 8 models
   on 3 providers, 3 % errors, a cost of 1..1000 × 1e-10 USD each. The insert is one statement, so the
   rollup trigger builds the rollups from its transition table as it goes (timed). Then the sums are
   checked: rollups equal the raw rows exactly (count, tokens, Decimal cost).
2. ``llm-gateway api`` (this checkout's code, ``python -m launcher.cli``) with ``GATEWAY_ADMIN_KEY``;
   ``GET /admin/usage?group_by=day`` over the month (and a few other reports) ``--requests`` times each,
   one at a time: p50/p99 client-side. For contrast, the same day grouping as one scan of the raw rows.
3. The usage flush's own write (500-row batches, as the flusher writes them) in rows/s: main's flusher
   (an executemany), this branch's (``UsageLedger.record_many``: one INSERT of arrays per batch) with
   the rollup trigger off and on, and the alternative design (the trigger off, the same INSERT's
   ``RETURNING`` feeding the rollup upserts in one statement) — alternated ``--rounds`` times.

Prints a markdown summary; the database is dropped at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import (
    DEFAULT_ADMIN_DB_URL,
    DEFAULT_REDIS_URL,
    ROOT,
    Proc,
    create_database,
    drop_database,
    free_port,
)

from common.db import make_session_factory, migrate  # noqa: E402 - _stack puts ROOT on sys.path
from common.settings import normalise_database_url  # noqa: E402
from workers.usage import UsageLedger  # noqa: E402

ADMIN = "bench-admin-key"
DB_NAME = "bench_usage"
TARGET_P50_MS = 50.0
MODELS = [("gpt-4o-mini", "openai"), ("gpt-4o", "openai"), ("o3", "openai"), ("claude-sonnet", "anthropic"),
          ("claude-haiku", "anthropic"), ("claude-opus", "anthropic"), ("llama3", "ollama"),
          ("qwen", "ollama")]
COLUMNS = ("call_id", "job_id", "api_key_id", "model", "provider", "provider_model", "prompt_tokens",
           "completion_tokens", "cost_usd", "queue_wait_ms", "upstream_latency_ms", "outcome", "status_code",
           "created_at")


def _migration() -> Any:
    """Migration 0005, for its rollup SQL (the CTE variant reuses it rather than copying it)."""
    path = ROOT / "migrations" / "versions" / "0005_usage_rollups.py"
    spec = importlib.util.spec_from_file_location("usage_rollups_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate(conn: Any, rows: int, days: int, keys: int) -> float:
    """``rows`` usage rows spread evenly over the last ``days`` days, in one statement; seconds taken."""
    models = "ARRAY[" + ", ".join(f"'{m}'" for m, _ in MODELS) + "]"
    providers = "ARRAY[" + ", ".join(f"'{p}'" for _, p in MODELS) + "]"
    t0 = time.perf_counter()
    conn.execute(f"""
        INSERT INTO usage ({', '.join(COLUMNS)})
        SELECT 'gen:' || i, 'job' || i, 'key_' || lpad((i % {keys})::text, 4, '0'),
               ({models})[1 + (i * 7) % {len(MODELS)}], ({providers})[1 + (i * 7) % {len(MODELS)}], 'pm',
               10 + i % 500, 1 + i % 300, (1 + (i * 13) % 1000) * 0.0000000001, i % 50, 200 + i % 900,
               CASE WHEN i % 33 = 0 THEN 'upstream_error' ELSE 'success' END, 200,
               now() - make_interval(secs => (i::float8 / {rows}) * {days} * 86400)
        FROM generate_series(1, {rows}) AS i""")
    return time.perf_counter() - t0


def check_sums(conn: Any) -> dict[str, Any]:
    raw = conn.execute("SELECT count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_usd), "
                       "count(*) FILTER (WHERE outcome <> 'success') FROM usage").fetchone()
    for table in ("usage_hourly", "usage_daily"):
        rolled = conn.execute(f"SELECT sum(requests), sum(input_tokens), sum(output_tokens), sum(cost_usd), "
                              f"sum(errors) FROM {table}").fetchone()
        assert tuple(rolled) == tuple(raw), (table, rolled, raw)
    counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("usage_hourly", "usage_daily")}
    return {"rows": raw[0], "cost_usd": raw[3], **counts}


def timed_get(url: str, n: int) -> list[float]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # warm-up (and a check that it answers)
        assert resp.status == 200
        resp.read()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flush_batch(n: int, tag: str) -> list[dict[str, Any]]:
    return [{"call_id": f"{tag}:{i}", "job_id": f"{tag}{i}", "api_key_id": f"key_{i % 50:04d}",
             "model": MODELS[i % len(MODELS)][0], "provider": MODELS[i % len(MODELS)][1],
             "provider_model": "pm", "prompt_tokens": 10 + i % 500, "completion_tokens": 1 + i % 300,
             "cost_usd": Decimal(1 + i % 1000) * Decimal("0.0000000001"), "queue_wait_ms": i % 50,
             "upstream_latency_ms": 200 + i % 900, "outcome": "success", "status_code": 200}
            for i in range(n)]


def unnest_insert(migration: Any, *, cte: bool) -> str:
    """One INSERT of a batch sent as arrays (``unnest``, as the flusher does); with ``cte``, the
    alternative to the trigger: its ``RETURNING`` feeds both rollup upserts in the same statement."""
    cols = [c for c in COLUMNS if c != "created_at"]
    types = {"cost_usd": "numeric", "status_code": "int", "prompt_tokens": "bigint",
             "completion_tokens": "bigint", "queue_wait_ms": "bigint", "upstream_latency_ms": "bigint"}
    arrays = ", ".join(f"unnest(%({c})s::{types.get(c, 'text')}[])" for c in cols)
    insert = (f"INSERT INTO usage ({', '.join(cols)}) SELECT {arrays} ON CONFLICT (call_id) DO NOTHING")
    if not cte:
        return insert
    hourly = migration._rollup_insert("usage_hourly", "hour", "ins")
    daily = migration._rollup_insert("usage_daily", "day", "ins")
    return f"WITH ins AS ({insert} RETURNING *), h AS ({hourly}) {daily}"


# variant → (rollup trigger on, how a 500-row batch is written)
VARIANTS = {
    "flusher as on main (executemany: a statement per row), no rollups": (False, "executemany"),
    "flusher now (one INSERT of arrays per batch), no rollups": (False, "ledger"),
    "flusher now + rollup trigger (chosen)": (True, "ledger"),
    "alternative: the same INSERT … RETURNING feeding the rollups (CTE), no trigger": (False, "cte"),
}


def flush_rates(database_url: str, total: int, rounds: int) -> dict[str, list[float]]:
    """rows/s of the flush's write, per variant, alternated so the machine's noise hits all alike."""
    import psycopg
    from sqlalchemy.dialects.postgresql import insert

    from common.db import Usage

    migration = _migration()
    statements = {"cte": unnest_insert(migration, cte=True)}
    sessions = make_session_factory(normalise_database_url(database_url), pool_size=2)
    ledger = UsageLedger(sessions)
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with psycopg.connect(database_url, autocommit=True) as conn:
        for r in range(rounds):
            for n, (variant, (trigger, how)) in enumerate(VARIANTS.items()):
                conn.execute(f"ALTER TABLE usage {'ENABLE' if trigger else 'DISABLE'} TRIGGER usage_rollup")
                rows = flush_batch(total, f"flush{r}v{n}")
                t0 = time.perf_counter()
                for i in range(0, total, 500):
                    batch = rows[i:i + 500]
                    if how == "ledger":
                        ledger.record_many(batch)
                    elif how == "executemany":
                        with sessions.begin() as session:
                            session.execute(insert(Usage).on_conflict_do_nothing(index_elements=["call_id"]),
                                            batch)
                    else:
                        columns = {c: [str(row[c]) for row in batch] for c in COLUMNS if c != "created_at"}
                        conn.execute(statements[how], columns)
                rates[variant].append(total / (time.perf_counter() - t0))
        conn.execute("ALTER TABLE usage ENABLE TRIGGER usage_rollup")
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--flush-rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    import psycopg

    database_url = create_database(DEFAULT_ADMIN_DB_URL, DB_NAME)
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    api: Proc | None = None
    try:
        migrate(normalise_database_url(database_url))
        with psycopg.connect(database_url, autocommit=True) as conn:
            seconds = generate(conn, args.rows, args.days, args.keys)
            conn.execute("VACUUM ANALYZE")
            sums = check_sums(conn)
            now = datetime.now(UTC)
            month = (f"from={now - timedelta(days=args.days):%Y-%m-%dT%H:%M:%SZ}"
                     f"&to={now:%Y-%m-%dT%H:%M:%SZ}")
            t0 = time.perf_counter()
            conn.execute("SELECT date_trunc('day', created_at, 'UTC'), count(*), sum(cost_usd) FROM usage "
                         "WHERE created_at >= now() - make_interval(days => %s) GROUP BY 1",
                         (args.days,)).fetchall()
            raw_scan_ms = (time.perf_counter() - t0) * 1000
        print(f"generated {sums['rows']:,} usage rows in {seconds:.1f}s with the rollup trigger on "
              f"({sums['rows'] / seconds:,.0f} rows/s); rollup rows: {sums['usage_hourly']:,} hourly, "
              f"{sums['usage_daily']:,} daily; sums equal the raw rows exactly (cost {sums['cost_usd']})")

        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({"DATABASE_URL": database_url, "REDIS_URL": DEFAULT_REDIS_URL, "GATEWAY_ADMIN_KEY": ADMIN,
                    "GATEWAY_KEY_PREFIX": "benchusage", "GATEWAY_AUTH": "off", "PYTHONUNBUFFERED": "1"})
        api = Proc("api", [sys.executable, "-m", "launcher.cli", "api", "--host", "127.0.0.1", "--port",
                           str(port), "--workers", "1"], env, workdir)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or not api.alive():
                    raise RuntimeError(f"the API did not start:\n{api.output()}") from None
                time.sleep(0.3)

        reports = [f"group_by=day&{month}", f"group_by=day,model&{month}", f"group_by=key&{month}",
                   f"group_by=day&key=key_0007&{month}", f"group_by=hour&{month}",
                   f"format=csv&group_by=day,key&{month}"]
        print(f"\n| `/admin/usage?…` over {args.days} days ({args.rows:,} rows) | p50 ms | p99 ms |\n"
              "|---|---|---|")
        for query in reports:
            times = timed_get(f"{base}/admin/usage?{query}", args.requests)
            name = query.split("&from=")[0]
            print(f"| `{name}` | {statistics.median(times):.1f} | {pct(times, 0.99):.1f} |")
        print(f"| (the raw rows scanned instead: one `GROUP BY day` in SQL) | {raw_scan_ms:.0f} | |")

        rates = flush_rates(database_url, args.flush_rows, args.rounds)
        base_rate = statistics.median(next(iter(rates.values())))
        print(f"\n| usage flush write ({args.flush_rows:,} rows in 500-row batches, {args.rounds} rounds "
              f"alternated) | rows/s (median) | vs main's flusher |\n|---|---|---|")
        for variant, values in rates.items():
            rate = statistics.median(values)
            print(f"| {variant} | {rate:,.0f} | {rate / base_rate:.2f}× |")
        return 0
    finally:
        if api is not None:
            api.stop()
        if not args.keep:
            drop_database(DEFAULT_ADMIN_DB_URL, DB_NAME)


if __name__ == "__main__":
    sys.exit(main())
