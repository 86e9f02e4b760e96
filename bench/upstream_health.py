"""What counting upstream attempts (common/upstream_health.py) costs on a worker's hot path.

    python -m bench.upstream_health [--redis redis://127.0.0.1:6379/0] [--calls 5000]

Measures, side by side against the same Redis: one PING round trip (the floor of any Redis step),
``record_success`` (what every answered upstream call now adds) and ``record_failure``; then
``snapshot`` of 10 providers (what one ``GET /health`` adds). Keys go under a throw-away prefix,
deleted at the end.
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Callable

import redis

from common.errors import UpstreamUnavailable
from common.upstream_health import UpstreamHealth


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis)
    prefix = "gwbench" + secrets.token_hex(4)
    health = UpstreamHealth(client, prefix)
    error = UpstreamUnavailable("cannot reach bench")
    providers = [f"p{i}" for i in range(10)]
    try:
        for _ in range(2):  # the second round is the one reported: warm connections, warm caches
            rows = {
                "PING (one round trip)": _per_call_us(client.ping, args.calls),
                "record_success": _per_call_us(lambda: health.record_success("p0"), args.calls),
                "record_failure": _per_call_us(lambda: health.record_failure("p1", error, "cannot reach"),
                                               args.calls),
                "snapshot of 10 providers": _per_call_us(lambda: health.snapshot(providers),
                                                         args.calls // 10),
            }
        for name, micros in rows.items():
            print(f"{name:28s} {micros:8.1f} µs per call")
    finally:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


if __name__ == "__main__":
    main()
