"""2,000 concurrent synchronous chat calls held open through the gateway against a slow upstream.

    .venv/bin/python bench/held.py                         # 2000 calls, upstream answers after 15 s
    .venv/bin/python bench/held.py --requests 500 --hold 5 # a quicker look
    .venv/bin/python bench/held.py --requests 5000 --rpm 1200 --hold 1   # held in line by a limit (~5 min)

It starts (and stops at the end, also on Ctrl-C) the same stack as ``bench/overhead.py``: the fake
upstream, a fresh Postgres database ``bench_gateway`` migrated with ``llm-gateway migrate``,
``llm-gateway api --workers 1`` and one ``llm-gateway worker --provider fake`` whose ``--concurrency``
and provider ``pool`` equal ``--requests`` (so every call can be upstream at once), with
``GATEWAY_AUTH=off``, Redis DB 9 and a unique ``GATEWAY_KEY_PREFIX``.

Once the gateway answers, the fake's latency is set to ``--hold`` seconds and ``--requests`` callers
(greenlets in this process, one keep-alive TCP connection each; the file-descriptor limit is raised
to the hard limit) each send one ``POST /v1/chat/completions`` with their own text and wait for the
answer. While they are held it samples, every ``--sample`` seconds:

* the API's resident memory (gunicorn master + workers, from psutil),
* the API's Redis connections: TCP connections of the API processes to port 6379 (psutil), the
  same matched against Redis ``CLIENT LIST`` by address, and the ``CLIENT LIST`` total (the whole
  server: other users of this Redis are included),
* how many client connections the API holds, and how many calls the fake upstream has in flight.

It reports: whether all calls completed with 200 and each got its own answer (``echo: held <i>``),
the errors by kind, the latency spread, and the peak/at-full-hold samples, as markdown. Raw samples
go to ``bench/results/held-<time>.json`` (git-ignored).

Held in line by a limit (``--rpm N``, optionally ``--tpm N``): the fake upstream *enforces* that limit
(real 429s, ``tests/fakeprovider.py``) and the gateway is configured with the same one, so most calls
are held by the API while their jobs wait in the provider's line at the worker — for up to
``ceil(requests / rpm) - 1`` minutes. ``max_wait`` (``--max-wait``, default: that many minutes + 120 s)
is sent with every call (``x-gateway-max-wait``; ``GATEWAY_MAX_WAIT_LIMIT`` is raised to match).
Besides the above it reports the client 429s (and how many came before their max_wait), the upstream's
429s by limit, when the last call was served against the ideal (the limit's own pace), and samples
the line, the broker queue and Redis's operations per second.
"""

from __future__ import annotations

# ruff: noqa: E402 -- the imports below come after monkey.patch_all() on purpose: the callers are
# greenlets, so socket, ssl and time must be gevent's before anything imports them.
from gevent import monkey

monkey.patch_all()

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gevent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import AUTH, DEFAULT_REDIS_URL, Stack, dumps
from load import HttpConnection, HttpError, build_request, percentile


def raise_nofile(need: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(need, 1 << 16)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        raise SystemExit(f"file-descriptor limit {soft} is below the {need} this run needs "
                         f"(hard limit {hard}); raise it with `ulimit -n`")
    return soft, hard


def sample(stack: Stack, redis_client: Any) -> dict[str, Any]:
    api = stack.api_processes()
    rss = 0
    redis_ports: set[int] = set()
    client_conns = 0
    per_process = []
    for p in api:
        try:
            mem = p.memory_info().rss
            conns = p.net_connections(kind="tcp")
        except Exception as exc:  # noqa: BLE001 - process gone between listing and reading
            print(f"sample: skipped pid {p.pid}: {exc!r}", file=sys.stderr)
            continue
        rss += mem
        r = [c for c in conns if c.raddr and c.raddr.port == 6379 and c.status == "ESTABLISHED"]
        redis_ports.update(c.laddr.port for c in r)
        held = sum(1 for c in conns if c.laddr and c.laddr.port == stack.api_port and c.raddr
                   and c.status == "ESTABLISHED")
        client_conns += held
        per_process.append({"pid": p.pid, "rss_mb": mem / 2**20, "redis_conns": len(r), "client_conns": held})
    clients = redis_client.client_list()
    api_in_client_list = sum(1 for c in clients if int(c.get("addr", ":0").rsplit(":", 1)[1]) in redis_ports)
    worker_rss = 0
    for p in stack.worker_processes():
        with contextlib.suppress(Exception):  # a process may be gone
            worker_rss += p.memory_info().rss
    try:
        upstream_in_flight = stack.fake.stats()["in_flight"] if stack.fake else None
    except Exception:  # noqa: BLE001
        upstream_in_flight = None
    try:
        pipe = redis_client.pipeline()
        pipe.zcard(f"{stack.prefix}:lim:fake:line")
        pipe.llen(f"{stack.prefix}:llm.fake")
        pipe.info("stats")
        line, queue, info = pipe.execute()
        ops = int(info.get("instantaneous_ops_per_sec", 0))
    except Exception:  # noqa: BLE001
        line = queue = ops = None
    return {"t": time.monotonic(), "api_rss_mb": rss / 2**20, "api_redis_conns": len(redis_ports),
            "api_redis_conns_in_client_list": api_in_client_list, "redis_client_list_total": len(clients),
            "api_client_conns": client_conns, "upstream_in_flight": upstream_in_flight,
            "worker_rss_mb": worker_rss / 2**20, "line": line, "queue": queue, "redis_ops_per_s": ops,
            "api_processes": per_process}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="concurrent calls to hold (default 2000)")
    p.add_argument("--hold", type=float, default=15.0, help="upstream latency in seconds (default 15)")
    p.add_argument("--sample", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which the calls are opened")
    p.add_argument("--worker-concurrency", type=int, default=None, help="default: --requests")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--rpm", type=int, default=None, help="upstream enforces it, gateway configured with it")
    p.add_argument("--tpm", type=int, default=None, help="upstream enforces it, gateway configured with it")
    p.add_argument("--max-wait", type=float, default=None,
                   help="max_wait of every call "
                        "(default: hold + 60, or with a limit the minutes it needs + 120 s)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--json-out", default=None)
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    n = args.requests
    soft, _hard = raise_nofile(n + 200)
    concurrency = args.worker_concurrency or n
    limits = {k: v for k, v in (("rpm", args.rpm), ("tpm", args.tpm)) if v}
    if args.max_wait is not None:
        max_wait = args.max_wait
    elif args.rpm:
        max_wait = 60.0 * math.ceil(n / args.rpm) + 120
    else:
        max_wait = args.hold + 60
    timeout = max_wait + args.hold + 120.0

    import redis

    stack = Stack(latency_ms=0, pool=max(concurrency, 1), worker_concurrency=concurrency,
                  redis_url=args.redis_url, max_wait=max_wait, provider_timeout=args.hold + 60,
                  keep_logs=args.keep_logs, workers=args.workers, limits=limits or None,
                  fake_limits=limits or None,
                  extra_env={"GATEWAY_MAX_WAIT_LIMIT": f"{max(3600.0, max_wait):g}"} if limits else None)
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    samples: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        print(f"starting the stack (worker concurrency {concurrency}) ...", file=sys.stderr, flush=True)
        stack.start()
        assert stack.fake is not None
        redis_client = redis.Redis.from_url(args.redis_url, decode_responses=True)
        baseline = sample(stack, redis_client)
        stack.fake.reset()
        stack.fake.configure(latency_ms=args.hold * 1000)

        headers = {**AUTH, "x-gateway-max-wait": f"{max_wait:g}"}

        def call(i: int) -> None:
            body = json.dumps({"model": "fake-model",
                               "messages": [{"role": "user", "content": f"held {i}"}]}).encode()
            host, port, raw = build_request(stack.url, body, headers)
            conn = HttpConnection(host, port, timeout=timeout)
            t0 = time.monotonic()
            try:
                status, resp_headers, resp = conn.request(raw)
                ok = (status == 200
                      and json.loads(resp)["choices"][0]["message"]["content"] == f"echo: held {i}")
                results[i] = {"status": status, "ok": ok, "latency": time.monotonic() - t0,
                              "done": time.monotonic(),
                              "queue_wait_ms": int(resp_headers.get("x-gateway-queue-wait-ms", "-1")),
                              "retry_after": resp_headers.get("retry-after"),
                              "error": None if ok else (resp[:300].decode("utf-8", "replace")
                                                        if status != 200 else "wrong answer")}
            except (OSError, HttpError, ValueError, KeyError) as exc:
                results[i] = {"status": None, "ok": False, "latency": time.monotonic() - t0,
                              "error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                conn.close()

        stop_sampling = False

        def sampler() -> None:
            while not stop_sampling:
                try:
                    samples.append(sample(stack, redis_client))
                except Exception as exc:  # noqa: BLE001
                    print(f"sample failed: {exc!r}", file=sys.stderr)
                gevent.sleep(args.sample)

        limited = f", limits {limits}, max_wait {max_wait:g} s" if limits else ""
        print(f"opening {n} calls over {args.ramp:g} s; the upstream answers after {args.hold:g} s"
              f"{limited} ...", file=sys.stderr, flush=True)
        t_start = time.monotonic()
        sampler_g = gevent.spawn(sampler)
        greenlets = []
        for i in range(n):
            greenlets.append(gevent.spawn(call, i))
            if args.ramp > 0 and i % 50 == 49:
                gevent.sleep(args.ramp * 50 / n)
        gevent.joinall(greenlets, timeout=timeout + 30)
        elapsed = time.monotonic() - t_start
        stop_sampling = True
        sampler_g.join(timeout=10)
        final = sample(stack, redis_client)
        fake_stats = stack.fake.stats()
    finally:
        if args.keep_logs:
            print(f"logs kept in {stack.workdir}", file=sys.stderr)
        stack.stop()

    done = [r for r in results if r]
    ok = sum(1 for r in done if r["ok"])
    statuses = Counter(str(r["status"]) for r in done)
    errors = Counter((r["error"] or "")[:120] for r in done if not r["ok"])
    lat = sorted(r["latency"] for r in done)
    if limits:  # "all held" = the most client connections open (the upstream sees only a few at a time)
        peak_hold = (max(samples, key=lambda s: (s["api_client_conns"], s["upstream_in_flight"] or 0))
                     if samples else {})
    else:
        peak_hold = (max(samples, key=lambda s: (s["upstream_in_flight"] or 0, s["api_client_conns"]))
                     if samples else {})

    def peak(key: str) -> float:
        return max((s[key] for s in samples if s.get(key) is not None), default=float("nan"))

    print(f"\n### Held calls — {started}: {n} concurrent sync calls, upstream latency {args.hold:g} s, "
          f"{args.workers} worker process(es) of concurrency {concurrency}, fd limit {soft}"
          f"{f', upstream and gateway limits {limits}, max_wait {max_wait:g} s' if limits else ''}\n")
    print("| measure | value |\n|---|---:|")
    rows = [
        ("calls completed with 200 and their own answer", f"{ok} / {n}"),
        ("errors", f"{n - ok}" + (f" {dict(statuses)}" if n - ok else "")),
        ("latency min / p50 / max (s)",
         f"{lat[0]:.2f} / {percentile(lat, 50):.2f} / {lat[-1]:.2f}" if lat else "–"),
        ("wall time for all calls (s)", f"{elapsed:.1f}"),
        ("peak calls in flight at the upstream", f"{fake_stats.get('concurrent_max')}"),
        ("peak client connections held by the API", f"{peak('api_client_conns'):.0f}"),
        ("API RSS idle → peak (MB, master + workers)",
         f"{baseline['api_rss_mb']:.0f} → {peak('api_rss_mb'):.0f}"),
        ("API RSS while all calls were held (MB)", f"{peak_hold.get('api_rss_mb', float('nan')):.0f}"),
        ("API Redis connections idle → peak (psutil)",
         f"{baseline['api_redis_conns']} → {peak('api_redis_conns'):.0f}"),
        ("API Redis connections while all were held (psutil / CLIENT LIST match)",
         f"{peak_hold.get('api_redis_conns')} / {peak_hold.get('api_redis_conns_in_client_list')}"),
        ("Redis CLIENT LIST total, idle → peak (whole server)",
         f"{baseline['redis_client_list_total']} → {peak('redis_client_list_total'):.0f}"),
        ("worker RSS idle → peak (MB)", f"{baseline['worker_rss_mb']:.0f} → {peak('worker_rss_mb'):.0f}"),
        ("API RSS after the run (MB)", f"{final['api_rss_mb']:.0f}"),
    ]
    if limits:
        client_429 = [r for r in done if r["status"] == 429]
        early_429 = [r for r in client_429 if r["latency"] < max_wait]
        last_done = max((r["done"] for r in done if r["ok"]), default=t_start) - t_start
        ideal = 60.0 * (math.ceil(n / args.rpm) - 1) if args.rpm else float("nan")
        waits = sorted(r["queue_wait_ms"] / 1000 for r in done if r["ok"])
        ops = [s["redis_ops_per_s"] for s in samples if s.get("redis_ops_per_s") is not None]
        rows += [
            ("client 429s (of which before their max_wait)", f"{len(client_429)} ({len(early_429)})"),
            ("upstream 429s by limit", f"{fake_stats.get('rate_limited')}"),
            ("last call served after (s) / ideal start of the last batch at the limit's pace (s)",
             f"{last_done:.1f} / {ideal:.0f}"),
            ("queue wait p50 / max (s)", f"{percentile(waits, 50):.1f} / {waits[-1]:.1f}" if waits else "–"),
            ("peak line at the worker / broker queue", f"{peak('line'):.0f} / {peak('queue'):.0f}"),
            ("Redis ops/s: median / peak while held",
             f"{statistics.median(ops):.0f}"
             f" / {peak('redis_ops_per_s'):.0f}" if samples else "–"),
        ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    if errors:
        print("\nerrors by kind:")
        for e, c in errors.most_common(10):
            print(f"- {c} × {e}")
    out = Path(args.json_out) if args.json_out else (
        Path(__file__).resolve().parent / "results" / f"held-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps({"started": started, "requests": n, "hold_s": args.hold, "ok": ok, "limits": limits,
                          "max_wait_s": max_wait, "workers": args.workers, "worker_concurrency": concurrency,
                          "statuses": dict(statuses), "errors": dict(errors), "baseline": baseline,
                          "final": final, "samples": samples,
                          "fake_stats": {k: v for k, v in fake_stats.items() if k != "by_content"}}))
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
