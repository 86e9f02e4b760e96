"""Scale-out: calls/s with 1, 2 and 4 worker processes for one provider, and with 2 API processes.

    .venv/bin/python bench/scale.py                      # 3 rounds, 4 s per cell, c=32 and c=128
    .venv/bin/python bench/scale.py --configs 1x1,2x1,4x1,2x2 --rounds 3 --duration 4

Each config ``WxA`` is one bench stack (``bench/_stack.py``: the fake upstream, a fresh database,
``llm-gateway api --workers A`` and W ``llm-gateway worker --provider fake`` processes; no Flower). All
stacks run at once (idle unless driven) and every round drives each in turn, with a direct-to-the-fake
cell first — interleaved, so a busy neighbour on the machine weighs on every config alike. Reports
median calls/s per config and its ratio to 1x1 and to direct, plus each config's CPU per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import AUTH, CHAT_BODY, Stack, cpu_seconds
from load import run_load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1x1,2x1,4x1,2x2", help="WORKERSxAPIS, comma-separated")
    p.add_argument("--concurrency", default="32,128")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--driver", default="auto")
    args = p.parse_args(argv)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    stacks: dict[str, Stack] = {}
    cells: dict[str, list[dict[str, Any]]] = {}
    try:
        for i, (w, a) in enumerate(configs):
            name = f"{w}x{a}"
            stacks[name] = Stack(workers=w, api_workers=a, db_name=f"bench_scale_{i}").start()
        first = next(iter(stacks.values()))
        assert first.fake is not None
        direct = first.fake.base_url + "/chat/completions"
        for s in stacks.values():
            run_load(s.url, concurrency=8, duration=2, body=CHAT_BODY, headers=AUTH, driver=args.driver)
        for rnd in range(args.rounds):
            order = list(stacks.items()) if rnd % 2 == 0 else list(stacks.items())[::-1]
            for c in levels:
                r = run_load(direct, concurrency=c, duration=args.duration, body=CHAT_BODY,
                             driver=args.driver)
                cells.setdefault(f"direct/{c}", []).append(r)
                for name, s in order:
                    procs = s.api_processes() + s.worker_processes()
                    cpu0 = cpu_seconds(procs)
                    r = run_load(s.url, concurrency=c, duration=args.duration, body=CHAT_BODY, headers=AUTH,
                                 driver=args.driver)
                    r["cpu_s"] = cpu_seconds(procs) - cpu0
                    cells.setdefault(f"{name}/{c}", []).append(r)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for s in stacks.values():
            s.stop()
    print(f"{args.rounds} interleaved rounds of {args.duration:g} s per cell; medians; "
          f"CPU = API + worker processes per call")
    print("| config (workers x APIs) | " + " | ".join(f"c={c} calls/s | ratio to 1x1 | CPU ms/call"
                                                     for c in levels) + " |")
    print("|---|" + "---:|---:|---:|" * len(levels))
    med = {k: statistics.median(r["rps"] for r in v) for k, v in cells.items()}
    print("| direct | " + " | ".join(f"{med[f'direct/{c}']:.0f} | | " for c in levels) + " |")
    for name in stacks:
        row = []
        for c in levels:
            runs = cells[f"{name}/{c}"]
            cpu = 1000 * sum(r["cpu_s"] for r in runs) / max(1, sum(r["requests"] for r in runs))
            errs = sum(r["errors"] for r in runs)
            row.append(f"{med[f'{name}/{c}']:.0f}{f' ({errs} errors)' if errs else ''} | "
                       f"{med[f'{name}/{c}'] / med[f'{configs[0][0]}x{configs[0][1]}/{c}']:.2f} | {cpu:.2f}")
        print(f"| {name} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
