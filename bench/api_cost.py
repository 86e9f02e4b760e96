"""The API's own cost per non-streamed call under ``llm-gateway up``, this checkout against another
(``--baseline``), measured two ways that a loaded machine moves less than calls/s or latency:

* **CPU ms per call at a fixed call rate** (open loop: ``--rate`` calls/s on 16 keep-alive
  connections), of the API (gunicorn's worker), the worker (a control: its code is the same on both
  sides unless the change touched it) and ``up`` itself (the supervisor, which forwards every log line
  of its children to the terminal). A closed loop (``bench/users.py``) gives each side the calls/s
  the machine lets it have, and CPU per call follows calls/s (fixed costs are shared by fewer calls,
  fewer events per loop iteration): at one fixed rate both sides pay the same fixed costs. Rounds
  alternate which side goes first; medians over rounds.
* **System calls per call** (``strace -c`` on the API's worker and on ``up`` during a c=32 run):
  exact counts, whatever the load.

    .venv/bin/python bench/api_cost.py --baseline CHECKOUT [--rounds 16 --duration 5 --rate 40]

Both sides run from their own checkout as in ``bench/users.py`` (the same registry and fake upstream).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _stack import cpu_seconds  # noqa: E402
from load import run_load  # noqa: E402
from users import CHAT, Side, UpAt, registry  # noqa: E402

from tests.fakeprovider import FakeProvider  # noqa: E402
from tests.integration.uprun import temporary_directory  # noqa: E402

CONNECTIONS = 16
PARTS = ("api", "worker", "up")


def fixed_rate(url: str, body: bytes, rate: float, duration: float) -> int:
    """``rate`` calls/s for ``duration`` s (each connection sends on its own schedule, waiting for
    each answer); returns the calls answered 200."""
    target = urlsplit(url)
    start = time.perf_counter() + 0.1
    answered = [0] * CONNECTIONS

    def connection(i: int) -> None:
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
        k = 0
        while (at := start + (k * CONNECTIONS + i) / rate) <= start + duration:
            time.sleep(max(0.0, at - time.perf_counter()))
            conn.request("POST", target.path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            answered[i] += response.status == 200
            k += 1

    threads = [threading.Thread(target=connection, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(answered)


def processes(side: Side) -> dict[str, list[Any]]:
    import psutil

    return {"api": side.groups["api"], "worker": side.groups["worker"],
            "up": [psutil.Process(side.up.proc.pid)]}


Rounds = dict[str, list[dict[str, float]]]   # per side, per round: CPU ms per call by part


def cpu_rounds(sides: dict[str, Side], body: bytes, args: argparse.Namespace) -> Rounds:
    out: Rounds = {name: [] for name in sides}
    names = list(sides)
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            procs = processes(sides[name])
            before = {part: cpu_seconds(procs[part]) for part in PARTS}
            calls = fixed_rate(sides[name].chat, body, args.rate, args.duration)
            out[name].append({part: 1000 * (cpu_seconds(procs[part]) - before[part]) / max(calls, 1)
                              for part in PARTS})
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    return out


def syscalls(side: Side, body: bytes, duration: float) -> dict[str, dict[str, float]]:
    """Per call, by system call: the API's worker and ``up`` during a c=32 run of ``duration`` s."""
    pids = {"api": side.groups["api"][-1].pid, "up": side.up.proc.pid}
    with temporary_directory("api-cost-") as tmp:
        files = {part: tmp / f"{part}.txt" for part in pids}
        spies = [subprocess.Popen(["strace", "-c", "-f", "-o", str(files[part]), "-p", str(pid)],
                                  stderr=subprocess.DEVNULL) for part, pid in pids.items()]
        time.sleep(1.0)
        calls = run_load(side.chat, concurrency=32, duration=duration, body=body, driver="gevent")["requests"]
        for spy in spies:
            spy.terminate()
            spy.wait(timeout=30)
        return {part: {name: count / calls for name, count in _strace_counts(files[part]).items()}
                for part in pids}


def _strace_counts(path: Path) -> dict[str, int]:
    counts = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z_0-9]+)$", line)
        if match and match.group(2) != "total":
            counts[match.group(2)] = int(match.group(1))
    return counts


def report(cpu: Rounds, calls: dict[str, dict[str, dict[str, float]]],
           args: argparse.Namespace) -> str:
    base, this = list(cpu)
    out = [f"CPU ms per call at {args.rate:g} calls/s ({args.rounds} rounds of {args.duration:g} s, medians; "
           "paired = median of the per-round ratios)", "",
           f"| part | {base} | {this} | ratio | paired ratio |", "|---|---:|---:|---:|---:|"]
    for part in PARTS:
        b, t = (statistics.median(r[part] for r in cpu[n]) for n in (base, this))
        paired = statistics.median(y[part] / x[part]
                                   for x, y in zip(cpu[base], cpu[this], strict=True) if x[part])
        out.append(f"| {part} | {b:.3f} | {t:.3f} | {t / b:.3f} | {paired:.3f} |")
    out += ["", "System calls per call (strace -c, c=32)", ""]
    for part in ("api", "up"):
        for name in (base, this):
            per = calls[name][part]
            top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:8])
            out.append(f"- {part}, {name}: {sum(per.values()):.1f} ({top})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the other checkout (e.g. main)")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per side per round")
    p.add_argument("--rate", type=float, default=40.0, help="calls/s; one both sides sustain on this machine")
    p.add_argument("--strace-duration", type=float, default=8.0)
    args = p.parse_args(argv)
    if shutil.which("strace") is None:
        p.error("strace is not installed (apt-get install strace)")
    body = json.dumps(CHAT).encode()
    with FakeProvider() as fake, temporary_directory("bench-api-cost-") as workdir:
        config = workdir / "registry.yaml"
        config.write_text(registry(fake.base_url))
        env = {"GATEWAY_CONFIG": str(config), "FAKE_API_KEY": "sk-bench-upstream"}
        sides: dict[str, Side] = {}
        try:
            sides["baseline"] = Side("baseline", UpAt(workdir / "b", Path(args.baseline).resolve(), env),
                                     workdir / "b")
            sides["this"] = Side("this", UpAt(workdir / "t", ROOT, env), workdir / "t")
            for side in sides.values():  # warm every path (the Redis pools grow to c=32), unrecorded
                run_load(side.chat, concurrency=32, duration=3, body=body, driver="gevent")
            cpu = cpu_rounds(sides, body, args)
            calls = {name: syscalls(side, body, args.strace_duration) for name, side in sides.items()}
        finally:
            for side in sides.values():
                side.stop()
    print(report(cpu, calls, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
