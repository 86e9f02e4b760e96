"""What one upstream call costs the worker: ``OpenAIAdapter.complete`` and ``.stream`` in-process against
``tests/fakeprovider.py``, beside a bare ``urllib3.PoolManager`` POST of the same body (the floor).

    .venv/bin/python bench/upstream_client.py                        # this checkout, 3 rounds
    .venv/bin/python bench/upstream_client.py --baseline ../main     # that checkout / this one, one run
    .venv/bin/python bench/upstream_client.py --calls 5000 --rounds 5 --no-gevent

Each round runs every side (this checkout, and ``--baseline``'s) in a fresh process, one after the
other, against one fake upstream (0 ms latency, started once). A side's process imports ``workers``
from its checkout, monkey-patches gevent as the worker does (``--no-gevent``: plain threads), warms up,
then makes ``--calls`` calls of each kind one at a time and reports CPU µs per call (``process_time``:
every thread of the process, the deadline watchdog included) and wall µs per call. The fake's CPU is
not counted. Per cell the median over rounds is printed. Run it by hand; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hello from the benchmark, "
                                             "twenty words or so of a prompt to echo back to us all"}]}
CELLS = ("floor answer", "adapter answer", "floor stream", "adapter stream")


def measure(call: Callable[[], Any], calls: int) -> dict[str, float]:
    """CPU and wall µs per call of ``calls`` calls (after a tenth as many to warm up)."""
    for _ in range(max(10, calls // 10)):
        call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        call()
    return {"cpu_us": (time.process_time() - cpu) / calls * 1e6,
            "wall_us": (time.perf_counter() - wall) / calls * 1e6}


def floor_calls(base_url: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A bare urllib3 POST of the same body, its JSON parsed; and the same streamed, read by line."""
    import urllib3

    http = urllib3.PoolManager(maxsize=4)
    url = f"{base_url}/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer k"}
    answer_body = json.dumps(BODY).encode()
    stream_body = json.dumps({**BODY, "stream": True, "stream_options": {"include_usage": True}}).encode()

    def answer() -> Any:
        return json.loads(http.request("POST", url, body=answer_body, headers=headers).data)

    def stream() -> Any:
        response = http.request("POST", url, body=stream_body, headers=headers, preload_content=False)
        events = _events(response)
        response.release_conn()
        return events

    return answer, stream


def _events(response: Any) -> list[Any]:
    """The SSE ``data:`` events of a urllib3 response, parsed as they arrive."""
    events, pending = [], b""
    for piece in response.stream(65536):
        pending += piece
        *lines, pending = pending.split(b"\n")
        events += [json.loads(line[5:]) for line in lines if line.startswith(b"data: {")]
    return events


def adapter_calls(base_url: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The worker's own calls: the adapter built as the worker builds it."""
    from common.registry import Model, Provider
    from common.types import ChatRequest
    from workers.adapters.base import build_adapter, make_http_session

    provider = Provider(name="fake", kind="openai", base_url=base_url, api_key="k", timeout=120)
    adapter = build_adapter(provider, make_http_session(provider.pool))
    model = Model(alias="alias", provider="fake", model="fake-model")
    request = ChatRequest(model="alias", messages=BODY["messages"])
    return (lambda: adapter.complete(request, model)), (lambda: list(adapter.stream(request, model)))


def side(code: Path, base_url: str, calls: int, use_gevent: bool) -> dict[str, dict[str, float]]:
    """One side's cells, in this process (importing ``workers`` from ``code``)."""
    if use_gevent:
        from gevent import monkey

        monkey.patch_all()
    sys.path.insert(0, str(code))
    floor_answer, floor_stream = floor_calls(base_url)
    answer, stream = adapter_calls(base_url)
    calls_of = dict(zip(CELLS, (floor_answer, answer, floor_stream, stream), strict=True))
    import workers

    assert Path(workers.__file__).resolve().is_relative_to(code), workers.__file__
    return {cell: measure(call, calls) for cell, call in calls_of.items()}


def run_side(code: Path, base_url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--side", str(code), "--url", base_url,
               "--calls", str(args.calls)] + ([] if args.gevent else ["--no-gevent"])
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=code, env=env).stdout
    result: dict[str, dict[str, float]] = json.loads(out.strip().splitlines()[-1])
    return result


def report(results: dict[str, list[dict[str, dict[str, float]]]]) -> None:
    names = list(results)
    print(f"median over {len(results[names[0]])} rounds, µs per call")
    header = "| cell | " + " | ".join(f"{n} CPU | {n} wall" for n in names) + " |"
    print(header)
    print("|---" * (1 + 2 * len(names)) + "|")
    for cell in CELLS:
        row = []
        for name in names:
            for key in ("cpu_us", "wall_us"):
                row.append(f"{statistics.median(r[cell][key] for r in results[name]):.0f}")
        print(f"| {cell} | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout, measured in the same run")
    parser.add_argument("--no-gevent", dest="gevent", action="store_false", help="plain threads")
    parser.add_argument("--side", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.url, args.calls, args.gevent)))
        return
    sys.path.insert(0, str(ROOT))
    from tests.fakeprovider import FakeProvider

    sides = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in sides}
    with FakeProvider(latency_ms=0) as fake:
        for number in range(args.rounds):
            order = list(sides) if number % 2 == 0 else list(reversed(sides))
            for name in order:
                results[name].append(run_side(sides[name], fake.base_url, args))
            print(f"round {number + 1}: " + ", ".join(
                f"{n} {results[n][-1]['adapter answer']['cpu_us']:.0f} µs CPU/answer" for n in order),
                file=sys.stderr)
    report(results)


if __name__ == "__main__":
    main()
