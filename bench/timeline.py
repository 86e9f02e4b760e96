"""One call's path through `up`, in milliseconds: c=1 latency, time to first token at c=1 and c=4, and
(with ``--monitor``) a Redis ``MONITOR`` timeline of one non-streamed and one streamed call — every
command a client sent (commands run inside Lua scripts left out), with its time since the first.

    .venv/bin/python bench/timeline.py                      # `up` from this checkout
    .venv/bin/python bench/timeline.py ../other --monitor   # `up` from another checkout, with timelines

It starts ``python -m launcher.cli up`` from CHECKOUT (as ``bench/users.py`` does, with the fake
upstream and one provider) and calls it sequentially on keep-alive connections, beside the fake called
directly. The timelines show where a call waits: the API's ``create.lua``, the worker's message
(kombu's unacked bookkeeping), its claim, the upstream call, the caller's answer (``emit.lua``), the
bookkeeping after it, the ack. ``MONITOR`` slows Redis down: read the order and the gaps, not the total.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import users  # noqa: E402  (bench/users.py: `up` as users run it, the fake, the stream reader)


def latencies_ms(url: str, body: bytes, n: int) -> list[float]:
    """``n`` sequential non-streamed calls on one keep-alive connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    out = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/json",
                                                             "Authorization": "Bearer sk-bench"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
        out.append((time.perf_counter() - started) * 1000)
    return out


def ttft_ms(base: str, path: str, body: bytes, n: int, concurrency: int) -> list[float]:
    """Time to the first content chunk of ``n`` streamed calls, ``concurrency`` at a time."""
    parts = urlsplit(base)
    out: list[float] = []

    def run() -> None:
        conn = http.client.HTTPConnection(parts.netloc, timeout=30)
        for _ in range(n // concurrency):
            out.append(users.first_token_s(conn, parts.path.rstrip("/") + path, body) * 1000)

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def monitor(client: Any, call: Any, window_s: float = 0.4) -> list[dict[str, Any]]:
    """The commands clients sent while ``call`` ran (and ``window_s`` after it began)."""
    lines: list[dict[str, Any]] = []
    with client.monitor() as mon:
        started = time.time()
        worker = threading.Thread(target=call)
        worker.start()
        for command in mon.listen():
            if command.get("client_type") != "lua":
                lines.append(command)
            if time.time() - started > window_s:
                break
        worker.join()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", nargs="?", default=str(users.ROOT))
    parser.add_argument("--n", type=int, default=200, help="calls per measure")
    parser.add_argument("--words", type=int, default=20, help="words per streamed answer")
    parser.add_argument("--monitor", action="store_true",
                        help="also print one call's Redis timeline each way")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for `up`")
    args = parser.parse_args()
    root = Path(args.checkout).resolve()
    chat = json.dumps(users.CHAT).encode()
    q = users.pct
    with users.FakeProvider() as fake, users.temporary_directory("bench-timeline-") as workdir:
        config = workdir / "registry.yaml"
        config.write_text(users.registry(fake.base_url))
        env = {"GATEWAY_CONFIG": str(config), "FAKE_API_KEY": "sk-bench-upstream",
               **dict(kv.split("=", 1) for kv in args.env)}
        side = users.Side("gateway", users.UpAt(workdir / "gateway", root, env), workdir / "gateway")
        try:
            path, stream = users.stream_bodies(args.words)["openai"]
            for _ in range(2):  # warm both paths
                latencies_ms(side.chat, chat, 50)
                ttft_ms(side.root, path, stream, 20, 1)
            direct = latencies_ms(fake.base_url + "/chat/completions", chat, args.n)
            gateway = latencies_ms(side.chat, chat, args.n)
            print(f"c=1 non-streamed: direct p50 {q(direct, .5):.2f} ms; gateway p50 {q(gateway, .5):.2f}, "
                  f"p99 {q(gateway, .99):.2f} ms")
            for c in (1, 4):
                d = ttft_ms(fake.base_url, "/chat/completions", stream, args.n // 2, c)
                g = ttft_ms(side.root, path, stream, args.n // 2, c)
                print(f"TTFT c={c}: direct p50 {q(d, .5):.2f} ms; gateway p50 {q(g, .5):.2f}, "
                      f"p99 {q(g, .99):.2f} ms")
            if args.monitor and side.redis is not None:
                for kind, call in (("non-streamed", lambda: latencies_ms(side.chat, chat, 1)),
                                   ("streamed", lambda: ttft_ms(side.root, path, stream, 1, 1))):
                    time.sleep(1.5)
                    lines = monitor(side.redis, call)
                    print(f"--- one {kind} call: ms, client, command")
                    first = lines[0]["time"] if lines else 0.0
                    for line in lines:
                        print(f"{(line['time'] - first) * 1000:8.2f} {line.get('client_port', '')} "
                              f"{line['command'][:110]}")
        finally:
            side.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
