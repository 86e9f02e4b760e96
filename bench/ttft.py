"""Time to first token of a streamed call: straight at the fake upstream vs through the gateway.

    .venv/bin/python bench/ttft.py [--requests 300] [--words 20]

Starts the bench stack (``bench/_stack.py``: fake upstream, fresh database, ``llm-gateway api`` and one
``llm-gateway worker``), then alternates one streamed call direct and one through the gateway — side
by side, sequential (concurrency 1), on keep-alive connections — and reports p50/p99 of the time from
sending the request to receiving the first content chunk, and the difference (the gateway's added
TTFT). Target (issue 4): added TTFT ≤ 5 ms p50.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stack import Stack
from bench.users import first_token_s  # the first line with answer text, in any protocol


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--words", type=int, default=20)
    args = parser.parse_args()
    content = " ".join(f"w{i}" for i in range(args.words))
    body = json.dumps({"model": "fake-model", "stream": True,
                       "messages": [{"role": "user", "content": content}]}).encode()
    with Stack() as stack:
        stack.start()
        assert stack.fake is not None
        direct_url = urlparse(stack.fake.base_url + "/chat/completions")
        gateway_url = urlparse(stack.url)
        # netloc is "host:port" (HTTPConnection splits it); hostname would be Optional
        direct = http.client.HTTPConnection(direct_url.netloc, timeout=30)
        gateway = http.client.HTTPConnection(gateway_url.netloc, timeout=30)
        for _ in range(20):  # warm both paths
            first_token_s(direct, direct_url.path, body)
            first_token_s(gateway, gateway_url.path, body)
        d, gw = [], []
        for _ in range(args.requests):
            d.append(first_token_s(direct, direct_url.path, body))
            gw.append(first_token_s(gateway, gateway_url.path, body))
    print(f"TTFT over {args.requests} streamed calls each way, alternating, concurrency 1, "
          f"{args.words}-word answers")
    print("| path | p50 ms | p99 ms | mean ms |")
    print("|---|---:|---:|---:|")
    print(f"| direct to the fake | {pct(d, .5):.2f} | {pct(d, .99):.2f} | {statistics.mean(d) * 1000:.2f} |")
    print(f"| through the gateway | {pct(gw, .5):.2f} | {pct(gw, .99):.2f} "
          f"| {statistics.mean(gw) * 1000:.2f} |")
    print(f"| **added** | **{pct(gw, .5) - pct(d, .5):.2f}** | **{pct(gw, .99) - pct(d, .99):.2f}** | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
