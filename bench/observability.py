"""What metrics and logging cost: added latency at c=1 and throughput at c=32, instrumented vs not,
side by side in one run.

    .venv/bin/python bench/observability.py                     # 3 rounds x 8 s per cell
    .venv/bin/python bench/observability.py --rounds 5 --duration 10
    .venv/bin/python bench/observability.py --control    # both instrumented: the noise floor
    .venv/bin/python bench/observability.py --swap       # OFF started and measured first

Two gateways (``bench/_stack.py``: fake upstream, fresh database, ``llm-gateway api`` + ``worker``),
started together and measured in alternation (ON, OFF, ON, OFF, ... so that the shared machine's
noise falls on both):

* **ON** — what ``up`` runs: metrics in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), JSON logs at
  INFO (one ``gateway.access`` line per request, one ``gateway.upstream`` line per attempt, to a file);
* **OFF** — ``GATEWAY_METRICS=off``, ``GATEWAY_LOG_LEVEL=WARNING``: nothing recorded per call.

Prints a markdown table: per concurrency, the median over rounds of p50 / p99 and req/s each way, and
the cost (ON minus OFF latency; OFF/ON - 1 for throughput). Target: <= 5 % each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import CHAT_BODY, Stack, cpu_seconds
from load import have_wrk, run_load

TARGET_PCT = 5.0


def _stacks(control: bool, swap: bool) -> dict[str, Stack]:
    def on() -> dict[str, str]:
        return {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-metrics-"),
                "GATEWAY_LOG_FORMAT": "json", "GATEWAY_LOG_LEVEL": "INFO"}
    # --control: both stacks instrumented, so the table shows what differs between two equal stacks
    off = on() if control else {"GATEWAY_METRICS": "off", "GATEWAY_LOG_LEVEL": "WARNING"}
    stacks = {"on": Stack(db_name="bench_obs_on", extra_env=on()),
              "off": Stack(db_name="bench_obs_off", extra_env=off)}
    # --swap: OFF is started (and measured) first; a run each way cancels the stacks' positions
    return dict(reversed(list(stacks.items()))) if swap else stacks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--control", action="store_true", help="instrument both stacks (the noise floor)")
    p.add_argument("--swap", action="store_true", help="start and measure OFF first")
    args = p.parse_args(argv)
    driver = "wrk" if have_wrk() else "gevent"
    stacks = _stacks(args.control, args.swap)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for stack in stacks.values():
            stack.start()
        for c in [int(x) for x in args.concurrency.split(",")]:
            for stack in stacks.values():   # warm-up, unrecorded
                run_load(stack.url, concurrency=c, duration=2, body=CHAT_BODY, headers=stack.auth,
                         driver=driver)
            for r in range(args.rounds):
                for name, stack in (stacks.items() if r % 2 == 0 else reversed(list(stacks.items()))):
                    print(f"c={c} round {r + 1}: {name} ...", file=sys.stderr, flush=True)
                    procs = stack.api_processes() + stack.worker_processes()
                    cpu = cpu_seconds(procs)
                    result = run_load(stack.url, concurrency=c, duration=args.duration, body=CHAT_BODY,
                                      headers=stack.auth, driver=driver, timeout=60)
                    # the gateway's CPU per call (API + worker): what instrumentation adds shows here
                    # even when the shared machine's load blurs latency and throughput
                    result["cpu_ms"] = 1000 * (cpu_seconds(procs) - cpu) / max(1, result["requests"])
                    results.setdefault((name, c), []).append(result)
                    time.sleep(1.0)
    finally:
        for stack in stacks.values():
            stack.stop()
    print(table(results, driver, args))
    return 0


def table(results: dict[tuple[str, int], list[dict[str, Any]]], driver: str, args: argparse.Namespace) -> str:
    def med(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, c)])

    out = [f"driver {driver}, {args.rounds} rounds x {args.duration:g} s, medians; fake upstream 0 ms",
           "", "| concurrency | OFF p50 / p99 ms | ON p50 / p99 ms | OFF req/s | ON req/s "
           "| gateway CPU ms/call OFF / ON | cost | errors |",
           "|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in sorted({c for _, c in results}):
        keys = ("p50_ms", "p99_ms", "rps", "cpu_ms")
        off, on = ([med(name, c, key) for key in keys] for name in ("off", "on"))
        errors = sum(r["errors"] for name in ("on", "off") for r in results[(name, c)])
        if c == 1:
            cost = (f"p50 +{on[0] - off[0]:.2f} ms ({100 * (on[0] / off[0] - 1):+.1f} %), "
                    f"p99 +{on[1] - off[1]:.2f} ms")
        else:
            cost = f"throughput {100 * (on[2] / off[2] - 1):+.1f} %"
        cost += f"; CPU/call {100 * (on[3] / off[3] - 1):+.1f} %"
        out.append(f"| {c} | {off[0]:.2f} / {off[1]:.2f} | {on[0]:.2f} / {on[1]:.2f} | {off[2]:.0f} | "
                   f"{on[2]:.0f} | {off[3]:.2f} / {on[3]:.2f} | {cost} | {errors} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
