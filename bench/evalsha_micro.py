"""CPU per call of one script call the way the API makes it (gevent, a ``BlockingConnectionPool``,
``create.lua``-sized arguments): redis-py's ``Script.__call__`` against ``common.lua.LeanScript`` (a bare
``EVALSHA`` through ``execute_command``) and, for scale, the pool and connection by hand (no retry,
no observability hooks: what a leaner client could reach). Short batches interleaved, quantiles over
batches (the machine is shared).

    .venv/bin/python bench/evalsha_micro.py [--redis redis://127.0.0.1:6379/0] [--batches 40]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import lua  # noqa: E402

KEYS = ["evalsha_micro:a", "evalsha_micro:b"]
ARGS: list[Any] = ["x" * 300, 30, "reply", 61, "m" * 800, 0, 5000, 0, 0]   # a spec, a broker message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--calls", type=int, default=300)
    opts = parser.parse_args()
    pool = redis.BlockingConnectionPool.from_url(opts.redis, max_connections=64, timeout=10,
                                                 health_check_interval=30)
    client = redis.Redis(connection_pool=pool)
    script = client.register_script("return ARGV[1]")
    lean = lua.LeanScript(client, "return ARGV[1]")
    script(keys=KEYS, args=ARGS)

    def by_hand() -> Any:
        conn = pool.get_connection()
        try:
            conn.send_command("EVALSHA", script.sha, len(KEYS), *KEYS, *ARGS)
            return conn.read_response()
        finally:
            pool.release(conn)

    ways: dict[str, Callable[[], Any]] = {
        "Script()": lambda: script(keys=KEYS, args=ARGS),
        "lua.LeanScript": lambda: lean(keys=KEYS, args=ARGS),
        "by hand": by_hand,
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(opts.batches):
        for name, way in ways.items():
            start = time.process_time()
            for _ in range(opts.calls):
                way()
            samples[name].append((time.process_time() - start) / opts.calls * 1e6)
    for name, values in samples.items():
        values.sort()
        print(f"{name:10s} µs CPU per call: p25 {values[len(values) // 4]:6.1f}  "
              f"median {statistics.median(values):6.1f}")


if __name__ == "__main__":
    main()
