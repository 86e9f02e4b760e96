"""What the gateway adds: DIRECT (driver -> fake upstream) vs THROUGH THE GATEWAY
(driver -> API -> Redis queue -> worker -> fake upstream), non-streaming chat completions.

    .venv/bin/python bench/overhead.py                # 10 s per cell, c = 1, 32, 128, upstream 0 and 50 ms
    .venv/bin/python bench/overhead.py --duration 5 --concurrency 1,32 --latencies 0
    .venv/bin/python bench/overhead.py --direct-only  # just the fake upstream and the driver

It starts, as subprocesses in their own process groups, and stops again at the end (also on Ctrl-C):
the fake upstream (``python -m tests.fakeprovider``), a fresh Postgres database ``bench_gateway`` on
127.0.0.1:5432 (user postgres, trust auth) migrated with ``llm-gateway migrate``, ``llm-gateway api
--workers 1`` and ``llm-gateway worker --provider fake`` — with ``GATEWAY_AUTH=off``, Redis DB 9 and a
unique ``GATEWAY_KEY_PREFIX``; the database and the prefix's keys are removed afterwards.

For every upstream latency and concurrency it runs the load driver (``bench/load.py``: wrk if installed,
else gevent) for ``--duration`` seconds against the fake directly, then against the gateway (after a
short unrecorded warm-up), and prints a markdown table: p50/p99 both ways, the latency the gateway
adds (gateway minus direct), requests/s both ways, errors, and the CPU each process used during the
gateway run (percent of one core; the machine has 2). ``--json-out`` also keeps the raw numbers
(default: ``bench/results/overhead-<time>.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import AUTH, CHAT_BODY, DEFAULT_REDIS_URL, Stack, cpu_seconds, dumps
from load import have_wrk, run_load

TARGET_ADDED_P50_MS = 3.0
TARGET_ADDED_P99_MS = 10.0
TARGET_RPS = 500.0


def _measure(url: str, *, concurrency: int, duration: float, driver: str, groups: dict[str, list[Any]]
             ) -> dict[str, Any]:
    before = {name: cpu_seconds(procs) for name, procs in groups.items()}
    t0 = time.perf_counter()
    result = run_load(url, concurrency=concurrency, duration=duration, body=CHAT_BODY, headers=AUTH,
                      driver=driver, timeout=60)
    wall = time.perf_counter() - t0
    result["cpu_pct"] = {name: 100.0 * (cpu_seconds(procs) - before[name]) / wall
                         for name, procs in groups.items()}
    result["cpu_pct"]["driver"] = result["driver_cpu_pct"]
    return result


def _drain(stack: Stack, limit: float = 120.0) -> float:
    """Wait until the gateway has finished the calls the driver abandoned at the end of a run (the
    fake has nothing in flight and its call count stays put for a second); returns the seconds waited."""
    assert stack.fake is not None
    t0 = time.monotonic()
    last = -1
    while time.monotonic() - t0 < limit:
        st = stack.fake.stats()
        if st["in_flight"] == 0 and st["calls"] == last:
            break
        last = st["calls"]
        time.sleep(1.0)
    return max(0.0, time.monotonic() - t0 - 1.0)


def _fmt(v: float | None, nd: int = 1) -> str:
    if v is None or math.isnan(v):
        return "–"
    return f"{v:.{nd}f}"


def table(rows: list[dict[str, Any]], direct_only: bool) -> str:
    if direct_only:
        out = [("| upstream latency | concurrency | direct p50 ms | direct p99 ms | direct req/s | errors | "
                "CPU % fake / driver |"),
               "|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            d = r["direct"]
            out.append(f"| {r['latency_ms']:g} ms | {r['concurrency']} | {_fmt(d['p50_ms'], 2)} | "
                       f"{_fmt(d['p99_ms'], 2)} | {_fmt(d['rps'])} | {d['errors']} | "
                       f"{_fmt(d['cpu_pct'].get('fake'), 0)} / {_fmt(d['cpu_pct']['driver'], 0)} |")
        return "\n".join(out)
    out = [("| upstream latency | concurrency | direct p50 / p99 ms | gateway p50 / p99 ms "
            "| **added p50 / p99 ms** | direct req/s | gateway req/s | errors direct / gateway "
            "| CPU % api / worker / fake / driver (gateway run) | backlog drain s |"),
           "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        d, g = r["direct"], dict(r["gateway"])
        cpu = g["cpu_pct"]
        if g["requests"] == 0:  # wrk reports 0 latencies when nothing completed
            g["p50_ms"] = g["p99_ms"] = float("nan")
        out.append(
            f"| {r['latency_ms']:g} ms | {r['concurrency']} | "
            f"{_fmt(d['p50_ms'], 2)} / {_fmt(d['p99_ms'], 2)} | "
            f"{_fmt(g['p50_ms'], 2)} / {_fmt(g['p99_ms'], 2)} | "
            f"**{_fmt(g['p50_ms'] - d['p50_ms'], 2)} / {_fmt(g['p99_ms'] - d['p99_ms'], 2)}** | "
            f"{_fmt(d['rps'])} | {_fmt(g['rps'])} | {d['errors']} / {g['errors']}"
            f"{' ' + str(g['status']) if g['errors'] else ''} | "
            f"{_fmt(cpu.get('api'), 0)} / {_fmt(cpu.get('worker'), 0)} / {_fmt(cpu.get('fake'), 0)} / "
            f"{_fmt(cpu['driver'], 0)} | {_fmt(g.get('drain_s'))} |")
    return "\n".join(out)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        d, g = r["direct"], r["gateway"]
        if g["requests"] == 0:
            lines.append(f"- upstream {r['latency_ms']:g} ms, c={r['concurrency']}: "
                         "NO call completed through the gateway during the run: NOT met")
            continue
        if r["concurrency"] == 1:
            a50, a99 = g["p50_ms"] - d["p50_ms"], g["p99_ms"] - d["p99_ms"]
            ok = a50 <= TARGET_ADDED_P50_MS and a99 <= TARGET_ADDED_P99_MS
            lines.append(f"- upstream {r['latency_ms']:g} ms, c=1: added p50 {a50:.2f} ms (target <= "
                         f"{TARGET_ADDED_P50_MS:g}), p99 {a99:.2f} ms (target <= {TARGET_ADDED_P99_MS:g}): "
                         f"{'MET' if ok else 'NOT met'}")
        else:
            ok = g["rps"] >= TARGET_RPS and g["errors"] == 0
            lines.append(f"- upstream {r['latency_ms']:g} ms, c={r['concurrency']}: "
                         f"{g['rps']:.0f} req/s through the gateway, {g['errors']} errors "
                         f"(target >= {TARGET_RPS:g} req/s, 0 errors): {'MET' if ok else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each gateway run")
    p.add_argument("--concurrency", default="1,32,128")
    p.add_argument("--latencies", default="0,50", help="fake upstream latencies in ms")
    p.add_argument("--driver", choices=("auto", "wrk", "gevent"), default="auto")
    p.add_argument("--direct-only", action="store_true", help="do not start the gateway")
    p.add_argument("--worker-concurrency", type=int, default=None,
                   help="worker --concurrency (default: the provider pool)")
    p.add_argument("--pool", type=int, default=256, help="provider pool in the registry YAML")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a GATEWAY_* setting for the gateway's processes (repeatable)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--keep-logs", action="store_true", help="keep the API/worker logs (path printed)")
    args = p.parse_args(argv)
    concurrencies = [int(x) for x in args.concurrency.split(",") if x]
    latencies = [float(x) for x in args.latencies.split(",") if x]
    driver = args.driver if args.driver != "auto" else ("wrk" if have_wrk() else "gevent")

    extra_env = dict(item.split("=", 1) for item in args.env)
    stack = Stack(latency_ms=latencies[0], pool=args.pool, worker_concurrency=args.worker_concurrency,
                  redis_url=args.redis_url, keep_logs=args.keep_logs, extra_env=extra_env or None)
    rows: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        if args.direct_only:
            stack.start_fake()
        else:
            print("starting fake upstream, database, gateway api and worker ...", file=sys.stderr)
            stack.start()
        assert stack.fake is not None
        direct_url = f"{stack.fake.base_url}/chat/completions"
        import psutil

        groups: dict[str, list[Any]] = {"fake": [psutil.Process(stack.fake.pid)]}
        if not args.direct_only:
            groups["api"] = stack.api_processes()
            groups["worker"] = stack.worker_processes()
        for latency in latencies:
            stack.fake.configure(latency_ms=latency)
            for c in concurrencies:
                row: dict[str, Any] = {"latency_ms": latency, "concurrency": c}
                print(f"upstream {latency:g} ms, c={c}: direct ...", file=sys.stderr, flush=True)
                row["direct"] = _measure(direct_url, concurrency=c, duration=args.duration, driver=driver,
                                         groups=groups)
                if not args.direct_only:
                    if args.warmup > 0:
                        run_load(stack.url, concurrency=c, duration=args.warmup, body=CHAT_BODY, headers=AUTH,
                                 driver=driver)
                        _drain(stack)
                    print(f"upstream {latency:g} ms, c={c}: gateway ...", file=sys.stderr, flush=True)
                    row["gateway"] = _measure(stack.url, concurrency=c, duration=args.duration, driver=driver,
                                              groups=groups)
                    row["gateway"]["drain_s"] = _drain(stack)
                    if row["gateway"]["requests"] == 0:
                        print(f"WARNING: no call through the gateway completed in {args.duration:g} s "
                              f"(fake stats {stack.fake.stats()['by_status']}); see --keep-logs",
                              file=sys.stderr)
                rows.append(row)
        if not args.direct_only:
            st = stack.fake.stats()
            print(f"fake upstream saw {st['calls']} calls, by status {st['by_status']}, "
                  f"at most {st['concurrent_max']} at once", file=sys.stderr)
    finally:
        if args.keep_logs:
            print(f"logs kept in {stack.workdir}", file=sys.stderr)
        stack.stop()

    load1, load5, _ = os.getloadavg()
    print(f"\n### Gateway overhead — {started}, driver {driver}, {args.duration:g} s per cell, "
          f"{os.cpu_count()} cores, load average at the end {load1:.2f} / {load5:.2f}\n")
    print(table(rows, args.direct_only))
    if not args.direct_only:
        print()
        print("\n".join(verdict(rows)))
    out = Path(args.json_out) if args.json_out else (
        Path(__file__).resolve().parent / "results" / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps({"started": started, "driver": driver, "duration_s": args.duration, "rows": rows}))
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
