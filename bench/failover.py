"""Failover benchmark (issue 12): 1,000 chat calls at concurrency 32 on an alias served by two
deployments (two fake upstreams, one worker process each) while one upstream is killed and later
restarted on the same port.

    .venv/bin/python bench/failover.py                    # both scenarios side by side
    .venv/bin/python bench/failover.py --calls 400 --json

Scenarios, run one after the other on fresh stacks:

* ``breaker`` — the registry's breaker (opens after 5 failures in 30 s, half-opens after 3 s);
* ``no-breaker`` — the same with ``failures: 1000000`` (it never opens): what the retries and moves
  alone do.

Timeline of each: the calls start; after 25 % have been answered upstream *a* is SIGTERMed; after 60 %
it is started again on its port. Columns: client errors (any non-200), the calls that tried the dead
upstream (each moved call's ``x-gateway.attempts`` − 1: its failed tries there), moved calls
(``attempts`` > 1), calls served by *a* after its restart (the breaker closed again: a probe went
through), and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stack  # noqa: E402
from _stack import Proc, Stack, post_json  # noqa: E402

from tests.fakeprovider import FakeProvider  # noqa: E402


def gateway_cli() -> list[str]:
    """This checkout's CLI (the venv's console script may import another checkout's code)."""
    return [sys.executable, "-m", "launcher.cli"]


_stack.gateway_cli = gateway_cli   # the stack's processes run this checkout's code too


class TwoDeployments(Stack):
    """The stack of ``_stack.py`` with a second upstream (provider ``fb``) and the alias ``duo``."""

    def __init__(self, failures: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.failures = failures
        self.fake_b: FakeProvider | None = None

    def start_fake(self) -> FakeProvider:
        self.fake_b = FakeProvider(latency_ms=self.latency_ms).start()
        return super().start_fake()

    def env(self) -> dict[str, str]:
        env = super().env()
        assert self.fake is not None and self.fake_b is not None
        provider = ("  {name}:\n    kind: openai\n    base_url: {url}\n    api_key_env: FAKE_API_KEY\n"
                    "    pool: 256\n    timeout: 30\n    connect_timeout: 1\n    max_retries: 1\n")
        Path(env["GATEWAY_CONFIG"]).write_text(
            "providers:\n" + provider.format(name="fake", url=self.fake.base_url)
            + provider.format(name="fb", url=self.fake_b.base_url)
            + "models:\n  fake-model: {provider: fake, model: fake-model}\n"
            + "  duo:\n    deployments:\n      - {provider: fake, model: fake-model}\n"
            + "      - {provider: fb, model: fake-model}\n"
            + f"routing:\n  breaker: {{failures: {self.failures}, window_s: 30, open_s: 3}}\n")
        return env

    def start(self, ready_timeout: float = 90.0) -> TwoDeployments:
        super().start(ready_timeout)
        self.workers.append(Proc("worker-fb", [*gateway_cli(), "worker", "--provider", "fb", "--name",
                                               f"{self.prefix}-fb"], self.env(), self.workdir))
        deadline = time.monotonic() + ready_timeout
        while "ready." not in self.workers[-1].output() and time.monotonic() < deadline:
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        super().stop()
        if self.fake_b is not None:
            self.fake_b.stop()


def run(name: str, failures: int, calls: int, concurrency: int, latency_ms: float) -> dict[str, Any]:
    db_name = f"bench_failover_{name.replace('-', '_')}"
    stack = TwoDeployments(failures, latency_ms=latency_ms, db_name=db_name)
    stack.start()
    assert stack.fake is not None
    body = lambda i: json.dumps({"model": "duo", "messages": [  # noqa: E731
        {"role": "user", "content": f"failover call {i}"}]}).encode()
    done = 0
    restarted_at: list[int] = []
    lock = threading.Lock()
    results: list[tuple[int, dict[str, Any], float, int]] = []

    def call(i: int) -> None:
        nonlocal done
        started = time.perf_counter()
        try:
            status, raw = post_json(stack.url, body(i), timeout=120)
        except (OSError, urllib.error.URLError):
            status, raw = 0, b"{}"
        meta = json.loads(raw).get("x-gateway", {}) if status == 200 else {}
        with lock:
            done += 1
            results.append((status, meta, time.perf_counter() - started, len(restarted_at)))

    port = stack.fake.port
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(call, i) for i in range(calls)]
            while done < calls // 4:
                time.sleep(0.01)
            stack.fake.stop()                          # upstream a dies
            while done < calls * 6 // 10:
                time.sleep(0.01)
            stack.fake = FakeProvider(latency_ms=latency_ms, port=port).start()   # and comes back
            restarted_at.append(done)
            for f in futures:
                f.result()
    finally:
        stack.stop()
    latencies = sorted(r[2] for r in results)
    moved = [r for r in results if r[1].get("attempts", 1) > 1]
    return {
        "scenario": name, "calls": calls, "client_errors": sum(1 for r in results if r[0] != 200),
        "tried_dead": sum(r[1]["attempts"] - 1 for r in moved), "moved": len(moved),
        "served_by_a_after_restart": sum(1 for r in results if r[3] and r[1].get("provider") == "fake"),
        "answered_after_restart": sum(1 for r in results if r[3]),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = [run(name, failures, args.calls, args.concurrency, args.latency_ms)
            for name, failures in (("breaker", 5), ("no-breaker", 1_000_000))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| scenario | calls | client errors | tries on the dead upstream | calls moved | "
          "served by a after restart | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['scenario']} | {r['calls']} | {r['client_errors']} | {r['tried_dead']} | {r['moved']} | "
              f"{r['served_by_a_after_restart']} of {r['answered_after_restart']} | {r['p50_ms']} | "
              f"{r['p99_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
