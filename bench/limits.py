"""Limits against an upstream that enforces them: how close the gateway's limiter runs to the limits
(without drawing the upstream's 429s), and how honest its ``Retry-After`` is.

    .venv/bin/python bench/limits.py                                   # every phase, ~14 min
    .venv/bin/python bench/limits.py --phases rpm,tpm --measure 120    # limiter precision only (~7 min)
    .venv/bin/python bench/limits.py --phases retry-steady,retry-window  # Retry-After accuracy only

Each phase starts its own stack (``bench/_stack.py``: the fake upstream, a fresh Postgres database,
``llm-gateway api`` and ``--workers`` × ``llm-gateway worker --provider fake``, Redis DB 9, a unique key
prefix; all stopped and cleaned up at the end) with the fake upstream *enforcing* limits
(``tests/fakeprovider.py``: sliding 60 s windows on its own clock, real 429s) and the gateway configured
at exactly the same limits (registry ``providers.fake.limits``).

Limiter precision (phases ``rpm`` and ``tpm``). Both enforce rpm ``--rpm`` (1200) and tpm ``--tpm``
(50,000) on both sides; ``--clients`` (400) closed-loop callers each send a sync chat call with
``x-gateway-max-wait: 3600`` and the next one as soon as the answer is back, so the line never runs dry
(demand is far above both limits). ``rpm``: small calls (5 tokens as the fake counts them, ``max_tokens``
8) — RPM binds. ``tpm``: ~85-token calls (41-word prompt, ``max_tokens`` 48) — TPM binds (~590
calls/min). The first ``--warmup`` (60) seconds are the first window (a burst as fast as the gateway
goes, then a wait for the window to slide); the steady state measured is the ``--measure`` (120) seconds
after it. From the fake's record of every call it accepted or refused (``/_control/timeline``) it
reports: calls and tokens accepted per minute over the measured span, as % of the limit; the same for
the sliding 60 s window ending at each second of the span (min / mean / max); the upstream's 429s
(during the whole run and the span); the clients' non-200 answers; the share of time the gateway's
shared cooldown was on; and the fastest second (calls started).

Retry-After accuracy (phases ``retry-steady``, ``retry-window``). A standing line: ``--retry-clients``
closed-loop callers with a long max_wait, against gateway and upstream limited to concurrency 4 with
a 250 ms upstream (steady service, ~16 calls/s) or to rpm 600 (service in bursts, once per window).
After a 60 s warm-up (the estimator's completion rate looks at the last minute), a probe call with
``max_wait`` ``--probe-max-wait`` (3 s) is sent every second; it expires in line with a 429 and a
``Retry-After`` estimate (jobs in line and queue ÷ completions per second over the last minute). The
truth is read off the background calls' own start times (send time + ``x-gateway-queue-wait-ms``):

* *position*: seconds from the probe's 429 until the last background call that was ahead of it (sent
  before it, not started at its expiry) started — when the probe would have started had it stayed;
* *whole line*: until the last call waiting at its expiry (ahead of it or behind) started — the
  quantity the estimator divides (it counts the whole line and queue).

It reports the ratio estimate ÷ truth for both (median, p10, p90) and the absolute error.

Raw results go to ``bench/results/limits-<time>.json`` (git-ignored).
"""

from __future__ import annotations

# ruff: noqa: E402 -- the imports below come after monkey.patch_all() on purpose: the callers are
# greenlets, so socket, ssl and time must be gevent's before anything imports them.
from gevent import monkey

monkey.patch_all()

import argparse
import bisect
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gevent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import AUTH, DEFAULT_REDIS_URL, Stack, dumps
from load import HttpConnection, HttpError, build_request

WINDOW = 60.0
LOREM_TEXT = ("the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly and "
              "a wizard's job is to vex chumps quickly in fog as pack my box with five dozen liquor jugs "
              "then sphinx of black quartz judge my vow")
LOREM = LOREM_TEXT.split()[:40]


def raise_nofile(need: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(need, 1 << 16)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def body_small(client: int, seq: int) -> bytes:
    # the fake bills 2 prompt words + "echo: limits c.s" 3 completion words = 5 tokens
    return json.dumps({"model": "fake-model", "max_tokens": 8,
                       "messages": [{"role": "user", "content": f"limits {client}.{seq}"}]}).encode()


def body_large(client: int, seq: int) -> bytes:
    # 41 prompt words + 42 completion words = 83 tokens (~85 with longer ids); the gateway reserves
    # ceil(~250 chars / 3) + 7 + max_tokens 48 ≈ 140 and settles to the real count
    words = [f"t{client}.{seq}", *LOREM]
    return json.dumps({"model": "fake-model", "max_tokens": 48,
                       "messages": [{"role": "user", "content": " ".join(words)}]}).encode()


class Caller:
    """Closed-loop sync callers on keep-alive connections; every call's record goes to ``records``."""

    def __init__(self, url: str, max_wait: float) -> None:
        self.url = url
        self.max_wait = max_wait
        self.records: list[dict[str, Any]] = []

    def one(self, conn: HttpConnection, body: bytes, max_wait: float, **tags: Any) -> dict[str, Any]:
        _, _, raw = build_request(self.url, body, {**AUTH, "x-gateway-max-wait": f"{max_wait:g}"})
        rec: dict[str, Any] = {"t_sent": time.time(), **tags}
        self.records.append(rec)
        try:
            status, headers, resp = conn.request(raw)
        except (OSError, HttpError) as exc:
            conn.close()
            rec.update(t_done=time.time(), status=None, error=f"{type(exc).__name__}: {exc}"[:200])
            return rec
        rec.update(t_done=time.time(), status=status)
        if status == 200:
            rec["wait_s"] = int(headers.get("x-gateway-queue-wait-ms", "-1")) / 1000
            rec["start"] = rec["t_sent"] + rec["wait_s"]
        else:
            rec["retry_after"] = headers.get("retry-after")
            try:
                rec["code"] = json.loads(resp)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                rec["code"] = resp[:200].decode("utf-8", "replace")
        return rec

    def loop(self, client: int, make_body: Any, stop_at: float) -> None:
        host, port, _ = build_request(self.url, b"", {})
        conn = HttpConnection(host, port, timeout=self.max_wait + 120)
        seq = 0
        while time.time() < stop_at:
            rec = self.one(conn, make_body(client, seq), self.max_wait, client=client, bg=True)
            seq += 1
            if rec["status"] is None:
                gevent.sleep(0.5)
        conn.close()


class CooldownSampler:
    def __init__(self, stack: Stack) -> None:
        import redis

        self.redis = redis.Redis.from_url(stack.redis_url)
        self.key = f"{stack.prefix}:lim:fake:cooldown"
        self.line_key = f"{stack.prefix}:lim:fake:line"
        self.samples: list[tuple[float, bool, int]] = []
        self._stop = False
        self._g = gevent.spawn(self._run)

    def _run(self) -> None:
        while not self._stop:
            try:
                pipe = self.redis.pipeline()
                pipe.pttl(self.key)
                pipe.zcard(self.line_key)
                cooldown, line = pipe.execute()
                self.samples.append((time.time(), cooldown > 0, int(line)))
            except Exception as exc:  # noqa: BLE001
                print(f"cooldown sample failed: {exc!r}", file=sys.stderr)
            gevent.sleep(0.1)

    def stop(self) -> None:
        self._stop = True
        self._g.join(timeout=5)

    def share(self, t0: float, t1: float) -> float:
        inside = [on for t, on, _ in self.samples if t0 < t <= t1]
        return sum(inside) / len(inside) if inside else float("nan")


def start_stack(args: argparse.Namespace, *, limits: dict[str, int], latency_ms: float,
                workers: int) -> Stack:
    stack = Stack(latency_ms=latency_ms, pool=args.pool, workers=workers, limits=limits, fake_limits=limits,
                  max_output_tokens=64, redis_url=args.redis_url, max_wait=60, provider_timeout=60,
                  extra_env={"GATEWAY_MAX_WAIT_LIMIT": "3600"}, keep_logs=args.keep_logs)
    print(f"  starting the stack: {workers} workers, limits {limits}, upstream latency {latency_ms:g} ms ...",
          file=sys.stderr, flush=True)
    stack.start()
    time.sleep(5)  # the readiness call proved one worker; give the others time to come up
    assert stack.fake is not None
    if args.reset_mode != "next":
        stack.fake.configure(reset_mode=args.reset_mode)
    return stack


# ----------------------------------------------------------------------------------- precision
def windows(times: list[float], weights: list[int], ends: list[float]) -> list[tuple[int, int]]:
    """(calls, weight sum) in (end - 60, end] for each end; ``times`` sorted."""
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    out = []
    for e in ends:
        lo, hi = bisect.bisect_right(times, e - WINDOW), bisect.bisect_right(times, e)
        out.append((hi - lo, prefix[hi] - prefix[lo]))
    return out


def precision_phase(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = {"rpm": args.rpm, "tpm": args.tpm}
    stack = start_stack(args, limits=limits, latency_ms=args.latency_ms, workers=args.workers)
    try:
        assert stack.fake is not None
        caller = Caller(stack.url, max_wait=3600)
        make_body = body_small if kind == "rpm" else body_large
        sampler = CooldownSampler(stack)
        t_start = time.time()
        stop_at = t_start + args.warmup + args.measure
        print(f"  {args.clients} closed-loop callers for {args.warmup + args.measure:g} s ...",
              file=sys.stderr, flush=True)
        greenlets = []
        for i in range(args.clients):
            greenlets.append(gevent.spawn(caller.loop, i, make_body, stop_at))
            if i % 50 == 49:
                gevent.sleep(0.05)
        gevent.sleep(max(0.0, stop_at - time.time()) + 2)
        sampler.stop()
        events = stack.fake.timeline(since=t_start - 1)["events"]
        stats = stack.fake.stats()
        gevent.killall(greenlets, block=False)
    finally:
        stack.stop()

    m0, m1 = t_start + args.warmup, t_start + args.warmup + args.measure
    ok = sorted((t, n) for t, n, outcome in events if outcome == "ok")
    refused = [(t, outcome) for t, _, outcome in events if outcome != "ok"]
    times, toks = [t for t, _ in ok], [n for _, n in ok]
    in_span = [(t, n) for t, n in ok if m0 < t <= m1]
    per_min = len(in_span) / (args.measure / WINDOW)
    tok_per_min = sum(n for _, n in in_span) / (args.measure / WINDOW)
    ends = [m0 + k for k in range(1, int(args.measure) + 1)]
    win = windows(times, toks, ends)
    per_second = Counter(int(t - t_start) for t in times)
    done = [r for r in caller.records if "status" in r]
    statuses = Counter(str(r["status"]) for r in done)
    result = {
        "kind": kind, "limits": limits, "workers": args.workers, "clients": args.clients,
        "reset_mode": args.reset_mode,
        "latency_ms": args.latency_ms, "warmup_s": args.warmup, "measure_s": args.measure,
        "span": [m0 - t_start, m1 - t_start],
        "calls_per_min": per_min, "tokens_per_min": tok_per_min,
        "rpm_pct": 100 * per_min / args.rpm, "tpm_pct": 100 * tok_per_min / args.tpm,
        "window_calls": {"min": min(c for c, _ in win), "mean": statistics.fmean(c for c, _ in win),
                         "max": max(c for c, _ in win)},
        "window_tokens": {"min": min(t for _, t in win), "mean": statistics.fmean(t for _, t in win),
                          "max": max(t for _, t in win)},
        "upstream_429": dict(Counter(o for _, o in refused)),
        "upstream_429_in_span": dict(Counter(o for t, o in refused if m0 < t <= m1)),
        "upstream_429_times": [round(t - t_start, 3) for t, _ in refused][:200],
        "client_statuses": dict(statuses),
        "client_errors": dict(Counter(r.get("error") or r.get("code") for r in done if r["status"] != 200)),
        "cooldown_share_span": sampler.share(m0, m1),
        "max_calls_in_one_second": max(per_second.values()) if per_second else 0,
        "fake_rate_limited": stats["rate_limited"],
        "calls_total": len(ok),
        "tokens_per_call": (sum(toks) / len(toks)) if toks else 0,
        "calls_per_second": [per_second.get(k, 0) for k in range(int(args.warmup + args.measure) + 1)],
        "client_failures": [{"t": round(r["t_sent"] - t_start, 3),
                             "after_s": round(r["t_done"] - r["t_sent"], 3), "status": r["status"],
                             "code": r.get("code") or r.get("error")}
                            for r in done if r["status"] != 200][:500],
        "logs": str(stack.workdir) if args.keep_logs else None,
    }
    return result


def print_precision(results: list[dict[str, Any]]) -> None:
    print("\n| binding limit | configured (gateway = upstream) | achieved over the span (/min) "
          "| % of limit | sliding 60 s window ending each second: min / mean / max "
          "| upstream 429s (whole run / span) | client non-200 | cooldown on | fastest second |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|")
    for r in results:
        lim = r["limits"]
        if r["kind"] == "rpm":
            got, pct, w, unit = r["calls_per_min"], r["rpm_pct"], r["window_calls"], "calls"
        else:
            got, pct, w, unit = r["tokens_per_min"], r["tpm_pct"], r["window_tokens"], "tokens"
        non200 = sum(v for k, v in r["client_statuses"].items() if k != "200")
        u_all = sum(r["upstream_429"].values())
        u_span = sum(r["upstream_429_in_span"].values())
        print(f"| {r['kind']} | rpm {lim['rpm']}, tpm {lim['tpm']} | {got:,.0f} {unit} | **{pct:.1f} %** | "
              f"{w['min']:,} / {w['mean']:,.0f} / {w['max']:,} {unit} | "
              f"{u_all} {r['upstream_429'] or ''} / {u_span} | "
              f"{non200} | {100 * r['cooldown_share_span']:.0f} % | {r['max_calls_in_one_second']} calls |")
    for r in results:
        other = (f"tokens {r['tokens_per_min']:,.0f}/min ({r['tpm_pct']:.1f} % of tpm)" if r["kind"] == "rpm"
                 else f"calls {r['calls_per_min']:,.0f}/min ({r['rpm_pct']:.1f} % of rpm)")
        print(f"- {r['kind']}: span = seconds {r['span'][0]:.0f}–{r['span'][1]:.0f} of the load; "
              f"the other limit: {other}; {r['tokens_per_call']:.1f} tokens per call; upstream 429 at (s): "
              f"{r['upstream_429_times'][:20]}")


# ----------------------------------------------------------------------------------- Retry-After
def retry_phase(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "retry-steady":
        limits, latency, clients = {"concurrency": 4}, 250.0, args.retry_clients
    else:
        limits, latency, clients = {"rpm": 600}, 100.0, args.retry_clients
    stack = start_stack(args, limits=limits, latency_ms=latency, workers=2)
    try:
        caller = Caller(stack.url, max_wait=3600)
        t_start = time.time()
        stop_at = t_start + args.warmup + args.measure
        print(f"  {clients} closed-loop callers, a probe (max_wait {args.probe_max_wait:g} s) every "
              f"{args.probe_interval:g} s after {args.warmup:g} s ...", file=sys.stderr, flush=True)
        greenlets = [gevent.spawn(caller.loop, i, body_small, stop_at) for i in range(clients)]
        host, port, _ = build_request(stack.url, b"", {})

        def probe(n: int) -> None:
            conn = HttpConnection(host, port, timeout=args.probe_max_wait + 60)
            try:
                caller.one(conn, body_small(-1, n), args.probe_max_wait, probe=n)
            finally:
                conn.close()

        gevent.sleep(args.warmup)
        probes = []
        n = 0
        while time.time() < stop_at:
            probes.append(gevent.spawn(probe, n))
            n += 1
            gevent.sleep(args.probe_interval)
        # let every background call sent so far finish: their start times are the truth
        gevent.joinall(greenlets, timeout=600)
        gevent.joinall(probes, timeout=60)
    finally:
        stack.stop()

    bg = [r for r in caller.records if r.get("bg")]
    pending = [r for r in bg if "status" not in r]
    served = sorted((r for r in bg if r.get("status") == 200), key=lambda r: r["t_sent"])
    rows = []
    for p in (r for r in caller.records if "probe" in r):
        if p.get("status") != 429:
            rows.append({"probe": p["probe"], "outcome": f"status {p.get('status')}"})
            continue
        t_exp, est = p["t_done"], float(p["retry_after"])
        ahead = [r["start"] for r in served if r["t_sent"] < p["t_sent"] and r["start"] > t_exp]
        waiting = [r["start"] for r in served if r["t_sent"] < t_exp and r["start"] > t_exp]
        censored = any(r["t_sent"] < t_exp for r in pending)
        rows.append({"probe": p["probe"], "outcome": "expired", "t": t_exp - t_start, "estimate_s": est,
                     "ahead": len(ahead), "waiting": len(waiting),
                     "truth_position_s": (max(ahead) - t_exp) if ahead else 0.0,
                     "truth_line_s": (max(waiting) - t_exp) if waiting else 0.0, "censored": censored})
    good = [r for r in rows if r["outcome"] == "expired" and not r["censored"]]

    def spread(key: str) -> dict[str, float]:
        ratios = sorted(r["estimate_s"] / r[key] for r in good if r[key] > 0.05)
        errors = sorted(r["estimate_s"] - r[key] for r in good)
        if not ratios:
            return {}
        q = statistics.quantiles(ratios, n=10) if len(ratios) >= 2 else [ratios[0]] * 9
        return {"median_ratio": statistics.median(ratios), "p10_ratio": q[0], "p90_ratio": q[-1],
                "min_ratio": ratios[0], "max_ratio": ratios[-1], "median_error_s": statistics.median(errors),
                "n": len(ratios)}

    statuses = Counter(str(r.get("status")) for r in bg)
    return {"kind": kind, "limits": limits, "latency_ms": latency, "clients": clients,
            "probe_max_wait_s": args.probe_max_wait, "probes": len(rows),
            "expired": sum(1 for r in rows if r["outcome"] == "expired"), "usable": len(good),
            "position": spread("truth_position_s"), "line": spread("truth_line_s"),
            "median_estimate_s": statistics.median([r["estimate_s"] for r in good]) if good else None,
            "median_truth_position_s": (statistics.median([r["truth_position_s"] for r in good])
                                        if good else None),
            "median_truth_line_s": statistics.median([r["truth_line_s"] for r in good]) if good else None,
            "median_ahead": statistics.median([r["ahead"] for r in good]) if good else None,
            "median_waiting": statistics.median([r["waiting"] for r in good]) if good else None,
            "background_statuses": dict(statuses), "rows": rows}


def print_retry(results: list[dict[str, Any]]) -> None:
    print("\n| scenario | probes expired / usable | median Retry-After s "
          "| median truth s: position / whole line "
          "| estimate ÷ truth (position): median [p10, p90] "
          "| estimate ÷ truth (whole line): median [p10, p90] "
          "| median error s (position / line) |")
    print("|---|---:|---:|---|---|---|---|")
    for r in results:
        pos, line = r["position"], r["line"]
        if not pos or not line:
            print(f"| {r['kind']} | {r['expired']} / {r['usable']} | – | – | – | – | – |")
            continue
        print(f"| {r['kind']} ({r['limits']}, upstream {r['latency_ms']:g} ms, {r['clients']} callers) | "
              f"{r['expired']} / {r['usable']} | {r['median_estimate_s']:.0f} | "
              f"{r['median_truth_position_s']:.1f} / {r['median_truth_line_s']:.1f} | "
              f"**{pos['median_ratio']:.2f}** [{pos['p10_ratio']:.2f}, {pos['p90_ratio']:.2f}] | "
              f"**{line['median_ratio']:.2f}** [{line['p10_ratio']:.2f}, {line['p90_ratio']:.2f}] | "
              f"{pos['median_error_s']:+.1f} / {line['median_error_s']:+.1f} |")
    for r in results:
        print(f"- {r['kind']}: median {r['median_ahead']} calls ahead of the probe, "
              f"{r['median_waiting']} waiting in all at its expiry; "
              f"background answers {r['background_statuses']}")


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="rpm,tpm,retry-steady,retry-window")
    p.add_argument("--rpm", type=int, default=1200)
    p.add_argument("--tpm", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=4,
                   help="worker processes on the provider (precision phases)")
    p.add_argument("--pool", type=int, default=256, help="provider pool (jobs per worker process)")
    p.add_argument("--clients", type=int, default=400, help="closed-loop callers (precision phases)")
    p.add_argument("--latency-ms", type=float, default=100.0, help="upstream latency (precision phases)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the measured span (>= 60)")
    p.add_argument("--measure", type=float, default=120.0, help="seconds measured")
    p.add_argument("--retry-clients", type=int, default=200, help="callers keeping the line (retry phases)")
    p.add_argument("--probe-max-wait", type=float, default=3.0)
    p.add_argument("--probe-interval", type=float, default=1.0)
    p.add_argument("--reset-mode", choices=("next", "full"), default="next",
                   help="what the fake's x-ratelimit-reset-* mean: until the next call fits (default) "
                        "or until the window is empty "
                        "(OpenAI's documented 'until the limit resets to its initial state')")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--json-out", default=None)
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    if args.warmup < WINDOW:
        p.error("--warmup must be at least 60 s: the measured windows must not reach back before the load")
    if args.measure % WINDOW:
        p.error("--measure must be a multiple of 60 s: the calls start in bursts once per window, "
                "so only whole windows give a per-minute rate")
    raise_nofile(args.clients * 2 + 500)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    precision: list[dict[str, Any]] = []
    retry: list[dict[str, Any]] = []
    for phase in phases:
        print(f"phase {phase}", file=sys.stderr, flush=True)
        if phase in ("rpm", "tpm"):
            precision.append(precision_phase(phase, args))
            print_precision(precision[-1:])
        elif phase in ("retry-steady", "retry-window"):
            retry.append(retry_phase(phase, args))
            print_retry(retry[-1:])
        else:
            p.error(f"unknown phase {phase!r}")
    print(f"\n### Limits — {started}")
    if precision:
        print(f"\nLimiter precision: {args.workers} worker processes, {args.clients} closed-loop callers, "
              f"upstream {args.latency_ms:g} ms, warm-up {args.warmup:g} s, measured {args.measure:g} s, "
              f"the fake's x-ratelimit-reset-* = {args.reset_mode}.")
        print_precision(precision)
    if retry:
        print(f"\nRetry-After accuracy: probes with max_wait {args.probe_max_wait:g} s every "
              f"{args.probe_interval:g} s for {args.measure:g} s after a {args.warmup:g} s warm-up.")
        print_retry(retry)
    out = Path(args.json_out) if args.json_out else (
        Path(__file__).resolve().parent / "results" / f"limits-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps({"started": started, "args": vars(args), "precision": precision, "retry": retry}))
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
